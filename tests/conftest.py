"""Shared pytest fixtures: tiny datasets in the released layouts, generated once per session.

TensorFlow is never imported at module import time here: only the fixtures that write or read RLDS data
import it (after torch and torchvision, see ``fixtures._tf``), so tests that need no TF stay fast.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

try:  # tests/ is a package: share one module instance with ``from tests import fixtures`` in the tests
    from tests import fixtures  # numpy only at import time
except ImportError:  # pragma: no cover  (tests/ run without its package)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fixtures

REPO = Path(__file__).resolve().parents[1]
BRIDGE_SAMPLE = REPO.parent / "shared/data/oxe/bridge_dataset/1.0.0"

#: seconds spent generating each session fixture (printed in the terminal summary)
GENERATION_TIMES: dict[str, float] = {}

_CACHE_STATE: dict[str, object] = {}


# ----------------------------------------------------------------------------------------------------
# NANOROBOT_CACHE: a throw-away cache directory for the whole session
# ----------------------------------------------------------------------------------------------------


def pytest_configure(config):
    """Point ``NANOROBOT_CACHE`` at a fresh per-session directory *before collection*, so code that reads
    it at import time never touches a real cache either. Restored and removed in ``pytest_unconfigure``."""
    _CACHE_STATE["old"] = os.environ.get("NANOROBOT_CACHE")
    _CACHE_STATE["dir"] = tempfile.mkdtemp(prefix="nanorobot_cache_")
    os.environ["NANOROBOT_CACHE"] = _CACHE_STATE["dir"]


def pytest_unconfigure(config):
    if "dir" in _CACHE_STATE:
        shutil.rmtree(_CACHE_STATE.pop("dir"), ignore_errors=True)
        old = _CACHE_STATE.pop("old", None)
        if old is None:
            os.environ.pop("NANOROBOT_CACHE", None)
        else:
            os.environ["NANOROBOT_CACHE"] = old


@pytest.fixture(scope="session", autouse=True)
def nanorobot_cache() -> Path:
    """The per-session ``NANOROBOT_CACHE`` directory (set for every test, no monkeypatch)."""
    os.environ["NANOROBOT_CACHE"] = _CACHE_STATE["dir"]
    return Path(_CACHE_STATE["dir"])


def pytest_terminal_summary(terminalreporter):
    if fixtures.TF_IMPORT_SECONDS is not None:
        GENERATION_TIMES["tf+tfds import"] = fixtures.TF_IMPORT_SECONDS
    if GENERATION_TIMES:
        terminalreporter.write_sep("-", "dataset fixture generation (s)")
        for name, dt in GENERATION_TIMES.items():
            terminalreporter.write_line(f"{name:>16s}: {dt:6.2f}")


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


def _require_tfds():
    """Skip unless tensorflow + tensorflow_datasets import. ``fixtures._tf()`` imports torch and
    torchvision first (the safe order), disables TF's GPUs and times the import."""
    pytest.importorskip("torch")
    try:
        fixtures._tf()
    except ImportError:
        pass
    pytest.importorskip("tensorflow_datasets")
    fixtures._tf()


def _timed(name, fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    GENERATION_TIMES[name] = time.perf_counter() - t
    return out


@pytest.fixture(scope="session")
def rlds_root(tmp_path_factory) -> Path:
    """Common root of the generated RLDS fixtures (``<root>/<dir_name>/<version>``)."""
    return tmp_path_factory.mktemp("rlds")


# ----------------------------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def bridge_path() -> Path:
    """The real Bridge sample (Octo's debug dataset, 25 train + 25 val episodes), read-only."""
    if not (BRIDGE_SAMPLE / "features.json").is_file():
        pytest.skip(f"shared Bridge sample not found at {BRIDGE_SAMPLE} (expected ../shared next to the repo)")
    return BRIDGE_SAMPLE


@pytest.fixture(scope="session")
def droid_path(rlds_root) -> Path:
    """``<root>/droid_100/1.0.0`` (internal name r2d2_faceblur), 5 episodes in 3 shards."""
    _require_tfds()
    return _timed("droid", fixtures.write_droid, rlds_root)


@pytest.fixture(scope="session")
def fractal_path(rlds_root) -> Path:
    """``<root>/fractal20220817_data/0.1.0``, 4 episodes in 2 shards."""
    _require_tfds()
    return _timed("fractal", fixtures.write_fractal, rlds_root)


@pytest.fixture(scope="session")
def kuka_path(rlds_root) -> Path:
    """``<root>/kuka/0.1.0``, 3 episodes in 2 shards (zlib tensors, episode-level ``success``)."""
    _require_tfds()
    return _timed("kuka", fixtures.write_kuka, rlds_root)


@pytest.fixture(scope="session")
def language_table_path(rlds_root) -> Path:
    """``<root>/language_table/0.0.1``, 3 episodes in 2 shards."""
    _require_tfds()
    return _timed("language_table", fixtures.write_language_table, rlds_root)


@pytest.fixture(scope="session")
def taco_path(rlds_root) -> Path:
    """``<root>/taco_play/0.1.0``, train 3 + test 2 episodes, 2 shards per split."""
    _require_tfds()
    return _timed("taco_play", fixtures.write_taco_play, rlds_root)


@pytest.fixture(scope="session")
def calvin_path(tmp_path_factory) -> Path:
    """A CALVIN dataset *root* holding ``training/`` (130 frames from id 360575) and ``validation/`` (124
    frames from id 53760), each with two segments separated by a gap of ids, ``ep_start_end_ids.npy``,
    ``ep_lens.npy``, ``statistics.yaml``, ``lang_annotations/auto_lang_ann.npy`` (and ``scene_info.npy`` in
    training only). No TensorFlow needed."""
    root = tmp_path_factory.mktemp("calvin")
    _timed("calvin training", fixtures.write_calvin, root, split="training")
    _timed("calvin validation", fixtures.write_calvin, root, num_frames=124, split="validation")
    return root


@pytest.fixture(scope="session")
def lerobot_v30_path(tmp_path_factory) -> Path:
    """A LeRobot v3.0 dataset (5 episodes, 2 data files, 3 mp4s per camera, 2 cameras, 64 px, 10 fps). No TF."""
    return _timed("lerobot v3.0", fixtures.write_lerobot_v30, tmp_path_factory.mktemp("lerobot") / "v30")


@pytest.fixture(scope="session")
def lerobot_v21_path(tmp_path_factory) -> Path:
    """A LeRobot v2.1 dataset (5 episodes in 2 chunk folders, a parquet and an mp4 per camera each). No TF."""
    return _timed("lerobot v2.1", fixtures.write_lerobot_v21, tmp_path_factory.mktemp("lerobot") / "v21")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run several times faster on one thread than on two cores shared with other work
    (used by the method tests through pytestmark)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def export_round_trip(tmp_path, monkeypatch):
    """ckpt path -> (its Policy, the Policy of its `eval_sim.py export` folder, the method) through eval_sim.load_policy
    (what evaluate --ckpt calls); the export is read with torch.load and pickle made to fail."""
    def run(ckpt):
        import pickle

        import eval_sim
        import torch
        eval_sim.main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "export")])
        policy, _ = eval_sim.load_policy(str(ckpt))
        for module, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
            monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("the export was read with pickle"))
        exported, method = eval_sim.load_policy(str(tmp_path / "export"))
        return policy, exported, method
    return run
