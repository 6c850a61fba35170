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
