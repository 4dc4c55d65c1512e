"""The four full-size official configurations produce exactly the released state-dict keys, shapes and order."""

import json

import pytest

import vqfr
from tests.conftest import SHARED

MANIFESTS = SHARED / "reference"


@pytest.mark.shared
@pytest.mark.parametrize("arch,alias", [("VQFRv1", "v1"), ("VQFRv2", "v2"), ("VQGANv1", "vqgan_v1"),
                                        ("VQGANv2", "vqgan_v2")])
def test_keys_and_shapes_match_manifest(arch, alias):
    path = MANIFESTS / f"manifest_{arch}.json"
    if not path.is_file():
        pytest.skip(f"{path} not found (../shared absent)")
    manifest = json.loads(path.read_text())
    model = vqfr.build_model(alias)
    ours = [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()]
    assert ours == [tuple(row) for row in manifest["state_dict"]]
    assert sum(p.numel() for p in model.parameters()) == manifest["total_parameters"]
    assert model.options == {"type": arch, **manifest["config"]}


@pytest.mark.parametrize("alias,count", [("v1", 459), ("v2", 503), ("vqgan_v1", 275), ("vqgan_v2", 329)])
def test_key_counts_without_shared(alias, count):
    assert len(vqfr.build_model(alias).state_dict()) == count
