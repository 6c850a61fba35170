from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
COVID_CSV = SHARED / "data" / "covid-ct" / "splits.csv"
LITE0_WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0_in1k.safetensors"


def require_shared(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} is absent: the real-data test needs ../shared beside the repo")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    from fedct.data.synthetic import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("synth") / "data", n=160, seed=0, size=64)
