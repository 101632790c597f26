import torch

from rl.weight_sync import SharedWeightBlock, WeightManifest, mapped_weights


def test_shared_block_round_trip_across_versions():
    tensors = [("a.weight", torch.randn(3, 5)), ("b.bias", torch.arange(7, dtype=torch.float32)), ("c", torch.ones(1, dtype=torch.bfloat16))]
    block = SharedWeightBlock(tensors)
    try:
        for version in (1, 2):
            updated = [(name, t * version) for name, t in tensors]
            manifest = WeightManifest.from_dict(block.write(updated, version).to_dict())
            assert manifest.version == version
            with mapped_weights(manifest) as views:
                assert [name for name, _ in views] == [name for name, _ in tensors]
                for (_, view), (_, expected) in zip(views, updated):
                    assert view.dtype == expected.dtype and torch.equal(view, expected)
    finally:
        block.close()
