"""The walkthrough notebooks (notebooks/<method>.ipynb) run top to bottom, headless, with no cell error: a batch
of real MetaWorld data through data.py, the small model, ~25 Adam steps whose loss must fall (each notebook
asserts it), and a one-episode rollout whose mp4 video must appear. Each notebook takes ~20-60 s on an idle 2-core
machine (the rollout of an untrained policy runs the full 500 steps), so the file takes a few minutes: it is
the price of running every notebook for real. The first run also collects 3 expert episodes of reach-v3 into
data/metaworld/reach-v3_3 (~15 s, reused afterwards)."""
import time
from pathlib import Path

import nbclient  # requirements.txt: nbformat, nbclient, ipykernel (the python3 kernel)
import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
METHODS = ["rt1", "gcbc", "hpt", "gr1", "mcr"]


def read(method):
    return nbformat.read(REPO / "notebooks" / f"{method}.ipynb", as_version=4)


@pytest.mark.parametrize("method", METHODS)
def test_notebook_is_stored_without_outputs(method):
    nb = read(method)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"notebooks/{method}.ipynb has no code cells"
    for cell in code:
        assert not cell.outputs and cell.execution_count is None, \
            f"notebooks/{method}.ipynb is stored with outputs: clear them before committing"


@pytest.mark.parametrize("method", METHODS)
def test_notebook_runs_headless(method, tmp_path, monkeypatch):
    """nbclient starts ipykernel's own python3 kernel (no `ipykernel install` needed); the kernel inherits
    os.environ: the session's NANOROBOT_CACHE, the matplotlib backend and the output folder for the rollout
    video. The backend is ipykernel's inline one, which is headless (it draws with Agg into PNG outputs);
    MPLBACKEND=Agg would draw nothing at plt.show(), and the plots would be missing from the outputs."""
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("NANOROBOT_NOTEBOOK_OUT", str(tmp_path))
    nb = read(method)
    start = time.time()
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO)}}).execute()  # raises on any cell error
    print(f"notebooks/{method}.ipynb: {time.time() - start:.1f} s")
    assert (tmp_path / method / "reach-v3.mp4").stat().st_size > 0
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3, "frames, actions and loss plots expected"
    assert any('<source src="data:video/mp4;base64,' in o.get("data", {}).get("text/html", "")
               for o in outputs), "the rollout video is not displayed"
    text = "".join(o.get("text", "") for o in outputs)
    assert "parameters" in text and "success" in text
