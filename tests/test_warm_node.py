"""`fedct node`: which SuperNode it starts, what it says, which apps it serves warm.

The warm node serving real runs is exercised by every Flower test on loopback (conftest's
`Federation` starts its nodes with `fedct node`)."""

import io
import zipfile

from typer.testing import CliRunner

from fedct.cli import app
from fedct.federated.warm_node import CLIENT_APP, fab_client_app, supernode_command

runner = CliRunner()


def fab_naming(clientapp: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as fab:
        fab.writestr("pyproject.toml", "[tool.flwr.app.components]\n"
                     f'serverapp = "x:server_app"\nclientapp = "{clientapp}"\n')
        fab.writestr("x.py", "")
    return buffer.getvalue()


def test_the_warm_node_recognises_fedcts_client_app_in_a_fab():
    assert fab_client_app(fab_naming(CLIENT_APP)) == CLIENT_APP
    assert fab_client_app(fab_naming("other.app:client_app")) == "other.app:client_app"


def test_warm_mode_starts_the_supernode_with_process_isolation(tmp_path):
    warm = supernode_command(superlink="10.0.0.5:9092", node_config="client-id=0", port=9100,
                             warm=True, root_certificates=tmp_path / "ca.crt", insecure=False,
                             extra=["--auth-supernode-private-key", "key"])
    assert warm[warm.index("--isolation") + 1] == "process"
    assert warm[warm.index("--root-certificates") + 1] == str(tmp_path / "ca.crt")
    assert warm[-2:] == ["--auth-supernode-private-key", "key"] and "--insecure" not in warm
    cold = supernode_command(superlink="10.0.0.5:9092", node_config="client-id=0", port=9100,
                             warm=False, root_certificates=None, insecure=True)
    assert "--isolation" not in cold and "--insecure" in cold


def test_node_says_its_mode_and_dry_run_prints_its_commands(tmp_path):
    (tmp_path / "ca.crt").write_text("x")
    base = ["node", "--superlink", "10.0.0.5:9092", "--node-config", "client-id=0",
            "--root-certificates", str(tmp_path / "ca.crt"), "--dry-run"]
    warm = runner.invoke(app, base, env={"COLUMNS": "200"})
    assert warm.exit_code == 0, warm.output
    assert "warm mode" in warm.output and "--isolation process" in warm.output
    cold = runner.invoke(app, [*base, "--mode", "process"], env={"COLUMNS": "200"})
    assert "process mode" in cold.output and "--isolation" not in cold.output
    neither = runner.invoke(app, base[:5] + ["--dry-run"])
    assert neither.exit_code == 2 and "--insecure" in neither.output
    missing = runner.invoke(app, [*base[:5], "--root-certificates", str(tmp_path / "no.crt")])
    assert missing.exit_code == 2 and "no.crt" in missing.output


class OffersTasks:
    """The SuperNode's Runtime API as the warm node claims from it: `tasks` offered in turn."""

    def __init__(self, tasks: list[str]):
        self.tasks, self.asked = list(tasks), 0

    def AcquireTask(self, request):  # noqa: N802 - the Runtime API's name
        from flwr.proto.runtime_pb2 import AcquireTaskResponse

        self.asked += 1
        if not self.tasks:
            return AcquireTaskResponse()
        response = AcquireTaskResponse(token=self.tasks.pop(0))
        response.task.task_id = self.asked
        return response


def test_a_task_offered_while_a_message_is_missing_is_served_next(monkeypatch):
    """The SuperNode offers a task only once it has given up the message of the one being
    served: such a task is claimed (at most once a second while the message is missing),
    kept, and served next; without one, the missing message is waited for."""
    from fedct.federated import warm_node

    clock = [100.0]
    monkeypatch.setattr(warm_node.time, "monotonic", lambda: clock[0])
    idle = warm_node.TaskClaims(OffersTasks([]))
    assert idle.claim() is None and not idle.newer_task()
    api = OffersTasks(["stale", "next"])
    claims = warm_node.TaskClaims(api)
    assert claims.claim() == "stale" and api.asked == 1
    clock[0] += 0.5
    assert not claims.newer_task() and api.asked == 1  # asked again only after a second
    clock[0] += 1.0
    assert claims.newer_task() and claims.newer_task() and api.asked == 2
    assert claims.claim() == "next" and api.asked == 2  # the kept task, not a new claim
    assert claims.claim() is None and api.asked == 3
