"""A SuperNode whose ClientApp stays warm: one process for every message of every run.

Flower 1.42 runs each message in a fresh `flwr-clientapp` process (its SuperExec starts one
per task), which imports torch, timm, opacus and fedct and rebuilds the model before any
work: seconds per message on every node. Its SuperNode also has a `process` isolation mode
that starts nothing and lets an outside process claim the tasks. `fedct node` uses that
mode: it starts `flower-supernode --isolation process` and, in its own process, claims each
task through the SuperNode's Runtime API and runs fedct's ClientApp in place, with the
same calls, the same context (its state kept by the SuperNode, so resume, SecAgg+ and a
restarted coordinator behave as before) and the same error replies as `flwr-clientapp`.
A task for another app is refused with an error reply naming the mode that serves it.
The SuperNode handles one message at a time, but when a run ends (stopped, or its
coordinator restarted) while a message of it is arriving, it drops the message and leaves
its task open: a task whose message never comes. Flower's own mode starts a process per
task, so only that process waits; here one process serves every task, so a task whose
message is still missing when the SuperNode offers the next one is given up for it.
What stays warm is the imports; each message still builds its model and reads its data
from the decoded-image cache (0.13 s for a small train message, measured in process).
"""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import threading
import time
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

CLIENT_APP = "fedct.federated.flower_app:client_app"
POLL_SECONDS = 0.2  # a loopback HTTP call: at 20 a second an idle node used 10-20% of a core
PULL_RETRY_SECONDS = 0.05  # first wait for message objects the SuperNode does not hold yet
NEWER_TASK_SECONDS = 1.0  # while a message is missing, how often to look for a newer task


def fab_client_app(content: bytes) -> str:
    """The ClientApp a FAB names in its pyproject.toml (`tool.flwr.app.components`)."""
    with zipfile.ZipFile(io.BytesIO(content)) as fab:
        name = next(n for n in fab.namelist() if n.endswith("pyproject.toml"))
        project = tomllib.loads(fab.read(name).decode())
    return project.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {}) \
        .get("clientapp", "")


class TaskClaims:
    """The SuperNode's ClientApp tasks as this process claims them: one at a time, except
    that a task claimed while the message of the one being served is missing waits here to
    be served next (the SuperNode offers it only once it has given that message up)."""

    def __init__(self, client):
        self.client = client
        self.next_token: str | None = None
        self.looked = 0.0
        self.lock = threading.Lock()

    def claim(self) -> str | None:
        """The token of a task to serve now, or None when the SuperNode offers none."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        if self.next_token:
            token, self.next_token = self.next_token, None
            return token
        self.looked = time.monotonic()
        claimed = self.client.AcquireTask(
            AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        return claimed.token if claimed.HasField("task") and claimed.token else None

    def newer_task(self) -> bool:
        """Whether the SuperNode offers a task after the one being served (claimed for
        next); asked at most every NEWER_TASK_SECONDS, from any of the pulling threads."""
        with self.lock:
            if self.next_token:
                return True
            if time.monotonic() - self.looked < NEWER_TASK_SECONDS:
                return False
            self.next_token = self.claim()
            return self.next_token is not None


def pull_task_input(client, claims: TaskClaims | None = None):
    """flwr-clientapp's `pull_task_input` with a short retry: the SuperNode offers the task
    before it has the message's objects from the SuperLink, and Flower's retry (1, 2, 4, 8 s)
    suits a process that took seconds to start, not one that claims the task at once. With
    `claims`, a missing message is given up once the SuperNode offers a newer task."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import (
        ObjectPullError,
        ObjectUnavailableError,
        pull_and_inflate_object_from_tree,
    )
    from flwr.supercore.task_identity import TaskIdentity

    task = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id = task.task_id, task.run.run_id
    TaskIdentity.node_id = task.context.node_id
    context = context_from_proto(task.context)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    pull_object = make_pull_object_fn_protobuf(client.PullObject, node, context.run_id)

    def pull_or_give_up(object_id: str) -> bytes:
        try:
            return pull_object(object_id)
        except ObjectUnavailableError:
            if claims is not None and claims.newer_task():
                raise ObjectPullError(object_id, "the SuperNode gave this message up (its run "
                                      "ended while it arrived) and offers a newer task") from None
            raise

    message = pull_and_inflate_object_from_tree(
        tree, pull_or_give_up,
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node,
                                                  context.run_id),
        return_type=Message, initial_backoff=PULL_RETRY_SECONDS, backoff_cap=0.5)
    # as flwr-clientapp does: a deflated message carries no id, its id is its object id
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context, run_from_proto(task.run), fab_from_proto(task.fab)


@dataclass
class TaskOutcome:
    """What one claimed task did: for the node's log and the benchmark."""

    run_id: int
    message_type: str
    seconds: float
    status: str
    detail: str = ""
    pulled: float = 0.0  # seconds until the message and its context were here
    answered: float = 0.0  # seconds until the ClientApp's reply (decode, work, encode)


def run_task(runtime_address: str, token: str, claims: TaskClaims | None = None) -> TaskOutcome:
    """One task, as `flwr-clientapp` runs it, but in this process: pull the message and the
    context, call the ClientApp, push the reply and the context, with a heartbeat meanwhile."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    from fedct.federated.flower_app import client_app

    started = time.perf_counter()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=make_simple_http_retry_invoker())
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = reply = context = None
    status, detail = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    run_id, kind, pulled, answered = 0, "?", 0.0, 0.0
    try:
        message, context, run, fab = pull_task_input(client, claims)
        pulled = time.perf_counter() - started
        run_id, kind = run.run_id, message.metadata.message_type
        named = fab_client_app(fab.content)
        if named != CLIENT_APP:
            raise LookupError(f"this fedct node runs fedct's ClientApp in warm mode, not "
                              f"{named or 'an unnamed one'}: start it with --mode process")
        reply = client_app(message=message, context=context)
        answered = time.perf_counter() - started
        status, detail = SubStatus.COMPLETED, ""
    except Exception as exc:  # noqa: BLE001 - the reply carries it, as flwr-clientapp's does
        detail = f"{type(exc)}:<'{exc}'>"
        code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(exc, LookupError) \
            else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        if message is not None:
            reply = Message(Error(code=code, reason=detail), reply_to=message)
        what = f"{kind} message of run {run_id}" if message is not None else \
            "a task whose message never came"
        print(f"fedct node: {what} failed: {exc}", file=sys.stderr)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
            push_task_output(client=client, context=context, sub_status=status, details=detail)
        finally:
            heartbeat.stop()
            client.close()
    return TaskOutcome(run_id, kind, time.perf_counter() - started, status, detail, pulled,
                       answered)


def serve(runtime_address: str, supernode: subprocess.Popen | None = None,
          log=sys.stderr) -> int:
    """Claim and run the SuperNode's ClientApp tasks until the SuperNode ends; its exit code."""
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    import fedct.federated.flower_app  # noqa: F401 - imported once, before the first message
    import fedct.federated.node  # noqa: F401

    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker())
    claims = TaskClaims(client)
    try:
        while supernode is None or supernode.poll() is None:
            try:
                token = claims.claim()
            except Exception:  # noqa: BLE001 - the SuperNode is starting or has just ended
                time.sleep(0.5)
                continue
            if token:
                done = run_task(runtime_address, token, claims)
                if done.message_type == "?":  # no message: run_task said why
                    continue
                print(f"fedct node: run {done.run_id}, {done.message_type} "
                      f"{done.status.lower()} in {done.seconds:.2f}s (pulled "
                      f"{done.pulled:.2f}s, ClientApp {done.answered - done.pulled:.2f}s, "
                      f"pushed {done.seconds - done.answered:.2f}s)", file=log, flush=True)
            else:
                time.sleep(POLL_SECONDS)
    finally:
        client.close()
    return supernode.returncode if supernode is not None else 0


def supernode_command(*, superlink: str, node_config: str, port: int, warm: bool,
                      root_certificates: Path | None, insecure: bool,
                      extra: list[str] = ()) -> list[str]:
    """The flower-supernode command `fedct node` starts (process isolation when warm)."""
    from fedct.federated.flower_run import flower_tool

    command = [flower_tool("flower-supernode")]
    command += ["--insecure"] if insecure else ["--root-certificates", str(root_certificates)]
    command += ["--superlink", superlink, "--port", str(port), "--node-config", node_config]
    return command + (["--isolation", "process"] if warm else []) + list(extra)


def end_with_parent() -> None:
    """In the SuperNode's process: die with `fedct node`, even when it is killed (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_node(command: list[str], *, port: int, warm: bool, env: dict | None = None) -> int:
    """Start the SuperNode (`supernode_command`) and, when warm, serve its tasks here;
    returns its exit code."""
    from fedct.federated.flower_run import flower_env

    process = subprocess.Popen(command, env={**flower_env(), **(env or {})},
                               preexec_fn=end_with_parent)
    # a SIGTERM ends this process through `finally`, which stops the SuperNode too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        if not warm:
            return process.wait()
        return serve(f"127.0.0.1:{port}", process)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
