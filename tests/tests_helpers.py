"""Helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

import torch

TINY = dict(embed_dim=64, depth=3, num_heads=4)
TINY_DECODER = dict(decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
