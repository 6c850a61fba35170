"""What the commands print fits the terminal: every cell whole at 80 and 120 columns."""

import pytest
from typer.testing import CliRunner

from fedct.cli import app

runner = CliRunner()


def printed(columns: int, *args, cut_paths: bool = False) -> str:
    """The command's output; no cell cut (but a path fedct shortened from the left)."""
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "…" not in (text.replace("│ …", "") if cut_paths else text), text
    assert max(map(len, text.splitlines())) <= columns, text
    return text


@pytest.mark.parametrize("columns", [80, 120])
def test_split_evaluate_and_predict_fit_the_terminal(columns, synth_dir, split_dir, checkpoint,
                                                     tmp_path):
    printed(columns, "split", synth_dir / "dataset.csv", "--out", tmp_path / "split",
            "--scheme", "dirichlet", "--clients", 4, "--min-per-client", 10, "--seed", 1)
    text = printed(columns, "evaluate", checkpoint, "--split", split_dir, "--on", "train",
                   "--per-client", "--bootstrap", 20)
    assert "sensitivity" in text and "ECE (calibration)" in text
    # images in a deep folder, one elsewhere: file names stay whole, folders give way
    deep = tmp_path / ("a-long-folder-name-of-a-hospital-archive" * 2) / "series"
    deep.mkdir(parents=True)
    images = sorted((synth_dir / "CT_COVID").glob("*.png"))[:3]
    for image in images:
        (deep / image.name).write_bytes(image.read_bytes())
    other = sorted((synth_dir / "CT_NonCOVID").glob("*.png"))[0]
    text = printed(columns, "predict", checkpoint, *sorted(deep.glob("*.png")), other,
                   "--out", tmp_path / "preds.csv", cut_paths=True)
    for image in images + [other]:
        assert image.name in text
    text = printed(columns, "predict", checkpoint, *sorted(deep.glob("*.png")),
                   "--out", tmp_path / "preds-one-folder.csv")
    assert "images under" in text and all(image.name in text for image in images)
