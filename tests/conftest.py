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
