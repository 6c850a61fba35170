import csv
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
COVID_CSV = SHARED / "data" / "covid-ct" / "splits.csv"
LITE0_WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0_in1k.safetensors"
# a federated run small enough for a unit test: a tiny timm model, 32 px, 2 rounds of 2 steps
TINY = {"model": "test_efficientnet", "image_size": 32, "batch_size": 16, "lr": 3e-3,
        "rounds": 2, "local_steps": 2}
THRESHOLD = 0.45  # the operating point stored with the `checkpoint` fixture


def require_shared(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} is absent: the real-data test needs ../shared beside the repo")


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Every test, and every module-scoped fixture, decodes into a cache of the test session's
    own, never the user's (session scope: set before any other fixture runs)."""
    cache = tmp_path_factory.getbasetemp() / "cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDCT_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    from fedct.data.synthetic import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("synth") / "data", n=160, seed=0, size=64)


@pytest.fixture(scope="session")
def split_dir(synth_dir, tmp_path_factory) -> Path:
    """The synthetic data over 2 IID clients; a module may define its own split_dir instead."""
    from fedct.data.manifest import SplitOptions, run_split

    out = tmp_path_factory.mktemp("split") / "split"
    run_split(synth_dir / "dataset.csv", out, SplitOptions(scheme="iid", clients=2, seed=0))
    return out


def write_node_csv(split_dir: Path, client_id: int, path: Path, rows: str = "train") -> Path:
    """A hospital's own CSV holding exactly one client's `rows` (train or local_val) of the
    split. It sits at the root of the images (paths are relative to it), named after `path`;
    returns where it is."""
    from fedct.data.manifest import load_split

    split = load_split(split_dir)
    target = split.root / f"node-{abs(hash(str(path)))}-{path.name}"
    with target.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "group"])
        for entry in split.select(clients=[client_id], split=rows):
            writer.writerow([entry.row.path, entry.row.label, entry.row.group])
    return target


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained tiny model (64 px) with a stored operating point: enough for the
    mechanics of predict, export and the checks on its files."""
    import torch

    from fedct.models import create_model, data_config
    from fedct.runs import checkpoint_meta, save_checkpoint

    torch.manual_seed(0)
    model = create_model("test_efficientnet", 2, pretrained="none")
    stem = tmp_path_factory.mktemp("ckpt") / "best"
    meta = checkpoint_meta(architecture="test_efficientnet", classes=["CT_COVID", "CT_NonCOVID"],
                           positive="CT_COVID", data_cfg=data_config(model, 64), stage="pretrain",
                           operating_point={"threshold": THRESHOLD, "rule": "youden",
                                            "source": "val"})
    save_checkpoint(stem, model.state_dict(), meta)
    return stem
