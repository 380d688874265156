import os
import sys

import pytest

# Tests never touch the network: Hugging Face and timm downloads fail fast instead of hanging.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """world.py's tiny world, built once per test session: 32 training and 8 validation scenes (val_00032.jpg ...),
    annotation files, a tar shard, and tiny backbones (bert/, llm/, vit.pth)."""
    import world

    return world.build_tiny_world(str(tmp_path_factory.mktemp("world")), n_train=32, n_val=8)


@pytest.fixture
def quickstart_in_process(monkeypatch):
    """runs.run (the quick start's and the studies' steps) runs each step inside this process (tests/scripts.py)
    with the arguments it was given, the lanes of runs.side_by_side one after the other: a new interpreter for each
    would cost more than the steps themselves at the tests' sizes. Yields the names of the steps run."""
    import time

    import runs
    from scripts import run_script

    steps = []

    def run(name, cmd, timings, threads=None, label=""):
        steps.append(name)
        t0 = time.time()
        print(run_script(cmd[0], *cmd[1:], timeout=600).stdout)  # as the subprocess would echo it
        timings[name] = timings.get(name, 0.0) + time.time() - t0
    monkeypatch.setattr(runs, "run", run)
    # one step at a time: a step run in this process changes its globals (sys.argv, stdout, signal handlers)
    monkeypatch.setattr(runs, "side_by_side", lambda *lanes: [lane() for lane in lanes])
    return steps
