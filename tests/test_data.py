"""Batch arithmetic: the global batch whatever the world size."""
import pytest

from nanomoe_ds.data import fit_accumulation, shard


@pytest.mark.parametrize("num_micro, world", [(40, 1), (40, 8), (8, 4), (1, 1), (6, 3)])
def test_global_batch_kept_where_it_divides(num_micro, world):
    assert fit_accumulation(num_micro, world, 12) == (num_micro, None)


@pytest.mark.parametrize("num_micro, world, fitted", [(1, 2, 2), (1, 8, 8), (5, 4, 8), (40, 16, 48), (3, 2, 4)])
def test_global_batch_rounded_up_and_said(num_micro, world, fitted):
    got, line = fit_accumulation(num_micro, world, 12)
    assert got == fitted and got % world == 0 and got >= num_micro
    assert line.startswith(f"global batch 12x{num_micro} -> 12x{fitted} for {world} ranks")


def test_shards_cover_the_global_batch_once():
    for world in (1, 2, 3, 4):
        parts = [shard(12, r, world) for r in range(world)]
        assert sorted(m for p in parts for m in p) == list(range(12))
        assert len({len(p) for p in parts}) == 1


def test_vocab_comes_from_meta_else_gpt2_with_a_line():
    from nanomoe_ds.data import choose_vocab
    assert choose_vocab({"vocab_size": 65}, 50304, 50304) == (65, None)  # nanoGPT: the data's vocab
    assert choose_vocab({"vocab_size": 65}, 128, 50304) == (128, None)  # an explicit --vocab_size wins
    vocab, line = choose_vocab(None, 50304, 50304)
    assert vocab == 50304 and line.startswith("no meta.pkl with the data: assuming GPT-2 tokens, vocab_size 50304")


def test_tokens_beyond_the_vocab_are_refused(tmp_path):
    import numpy as np
    from nanomoe_ds.config import ConfigError
    from nanomoe_ds.data import check_tokens_fit
    for split in ("train", "val"):
        np.array([0, 3, 9, 2], dtype=np.uint16).tofile(tmp_path / f"{split}.bin")
    check_tokens_fit(tmp_path, 10)
    with pytest.raises(ConfigError, match=r"train.bin holds token id 9, but vocab_size is 9"):
        check_tokens_fit(tmp_path, 9)
