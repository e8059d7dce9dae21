"""Packed documents: the data's document boundaries, and the same loss and gradients as running
every document on its own (local, ulysses and fpdt)."""

import numpy as np
import pytest
import torch

import fpdt_kernels
from experiments.training import corpus
from experiments.training.data import DataSpec, cu_seqlens_of, global_batch, replica_batch, square_tokens
from parallel import SPGroup, check_cu_seqlens, document_positions, parallelize, shard_batch

# ----------------------------------------------------------------------------- data


def test_eos_id_cuts_documents_after_each_end(tmp_path):
    tokens = np.array([5, 6, 0, 7, 8, 9, 0, 1, 2, 3, 4, 0, 6], dtype=np.uint16)
    path = tmp_path / "t.bin"
    tokens.tofile(path)
    spec = DataSpec(seq_len=12, batch_size=1, vocab_size=16, path=str(path), eos_id=0)
    inputs, labels, cu = replica_batch(spec, step=0, dp=1, replica=0)
    assert inputs[0].tolist() == tokens[:12].tolist() and labels[0].tolist() == tokens[1:].tolist()
    assert cu.tolist() == [0, 3, 7, 12]  # a document ends with its end-of-document id
    check_cu_seqlens(cu, 1, 12)


def test_index_file_gives_the_starts(tmp_path):
    tokens = np.arange(40, dtype=np.uint16) % 16
    (tmp_path / "t.bin").write_bytes(tokens.tobytes())
    np.save(tmp_path / "idx.npy", np.array([0, 9, 15, 33], dtype=np.int64))
    spec = DataSpec(seq_len=16, batch_size=3, vocab_size=16, path=str(tmp_path / "t.bin"),
                    index=str(tmp_path / "idx.npy"))  # fmt: skip
    windows, starts = global_batch(spec, step=2, dp=1)
    for row, row_starts in zip(windows, starts, strict=True):
        offset = int(row[0])  # token t holds t % 16 and windows start below 16 here: the offset
        want = [0] + [s - offset for s in (9, 15, 33) if offset < s < offset + 16]
        assert row_starts == want


def test_a_repeated_index_offset_starts_one_document(tmp_path):
    """An index may repeat an offset (an empty document): the window's starts hold it once, so
    its cu_seqlens increase strictly (a repeat failed the step that met it, mid-run)."""
    tokens = np.arange(40, dtype=np.uint16)  # token t holds t: a window's first token is its offset
    (tmp_path / "t.bin").write_bytes(tokens.tobytes())
    np.save(tmp_path / "idx.npy", np.array([0, 9, 9, 15, 15, 15, 33], dtype=np.int64))
    spec = DataSpec(seq_len=16, batch_size=3, vocab_size=64, path=str(tmp_path / "t.bin"),
                    index=str(tmp_path / "idx.npy"))  # fmt: skip
    spec.check_files()
    for step in range(4):
        windows, starts = global_batch(spec, step=step, dp=1)
        for row, row_starts in zip(windows, starts, strict=True):
            offset = int(row[0])
            assert row_starts == [0] + [s - offset for s in (9, 15, 33) if offset < s < offset + 16]
        check_cu_seqlens(replica_batch(spec, step, 1, 0)[2], 3, 16)


def test_synthetic_documents_are_seeded_and_rows_are_documents():
    spec = DataSpec(seq_len=64, batch_size=2, vocab_size=96, seed=3, doc_len=10)
    a = replica_batch(spec, step=5, dp=2, replica=1)
    b = replica_batch(spec, step=5, dp=2, replica=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    cu = a[2]
    check_cu_seqlens(cu, 2, 64)  # every row boundary is a document boundary
    lengths = (cu[1:] - cu[:-1]).float()
    assert 4 <= lengths.mean() <= 20  # about doc_len
    windows, starts = global_batch(spec, 5, 2)
    assert square_tokens(spec, 5, 2) == sum(int(v) ** 2 for v in (cu_seqlens_of(starts, 64).diff()))
    assert square_tokens(DataSpec(64, 2, 96), 5, 2) == 4 * 64 * 64  # unpacked: one document a row


def test_packing_off_and_bad_settings():
    spec = DataSpec(seq_len=8, batch_size=1, vocab_size=96, doc_len=3, packing=False)
    assert replica_batch(spec, 0, 1, 0)[2] is None
    with pytest.raises(ValueError, match="set data.path"):
        DataSpec(8, 1, 96, eos_id=0).check()
    with pytest.raises(ValueError, match="not a token id"):
        DataSpec(8, 1, 96, path="x", eos_id=96).check()
    with pytest.raises(ValueError, match="one way"):
        DataSpec(8, 1, 96, path="x", eos_id=0, index="i.npy").check()


def test_corpus_round_trip(tmp_path):
    text = "def f(x):\n\treturn x + 1  # ~\n"
    ids = corpus.encode(text)
    assert int(ids.max()) < corpus.VOCAB_SIZE == 96 and corpus.EOS not in ids.tolist()
    assert corpus.decode(ids) == text.replace("\t", "    ").replace("~", "?")
    src = tmp_path / "a.py"
    src.write_text(text)
    n, docs = corpus.write_corpus(tmp_path / "c.bin", [src, src])
    data = np.fromfile(tmp_path / "c.bin", dtype=np.uint16)
    assert docs == 2 and n == len(data) == 2 * (len(ids) + 1) and (data == corpus.EOS).sum() == 2


# ----------------------------------------------------------------------------- layout


def test_document_positions_restart_and_follow_the_layout():
    cu = torch.tensor([0, 3, 8, 10, 16], dtype=torch.int32)
    pos = document_positions(cu, 2, 8)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 0, 1, 2, 3, 4, 5]]
    tokens = torch.arange(16).reshape(2, 8)
    _, _, local = shard_batch(tokens, None, "fpdt", chunks=2, group=SPGroup(None, 1, 2), cu_seqlens=cu)
    assert local.tolist() == [[2, 0, 3, 4], [0, 1, 4, 5]]  # rank 1 holds tokens 2-3 and 6-7 of each row
    for bad, message in (([0, 3, 9, 16], "row boundary"), ([0, 3, 3, 16], "increase"), ([1, 16], "from 0")):
        with pytest.raises(ValueError, match=message):
            check_cu_seqlens(torch.tensor(bad, dtype=torch.int32), 2, 8)
    with pytest.raises(ValueError, match="int32"):
        check_cu_seqlens(torch.tensor([0, 16]), 2, 8)


# ----------------------------------------------------------------------------- loss and gradients


def _separate_documents(model, tokens, labels, cu):
    """Loss and gradients of every document run on its own, combined as one mean over tokens."""
    flat_t, flat_l = tokens.reshape(-1), labels.reshape(-1)
    model.zero_grad(set_to_none=True)
    total, count = 0.0, 0
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        mean = model(flat_t[None, a:b], labels=flat_l[None, a:b])
        n = b - a
        (mean * n).backward()  # the document's loss sum
        total, count = total + float(mean.detach()) * n, count + n
    grads = {k: p.grad / count for k, p in model.named_parameters()}
    return total / count, grads


@pytest.mark.parametrize(
    "strategy,chunks,order", [("local", 1, "auto"), ("ulysses", 1, "auto"), ("fpdt", 4, "kv"), ("fpdt", 4, "query")]
)
def test_packed_sequence_equals_separate_documents(strategy, chunks, order):
    import models

    torch.manual_seed(0)
    cfg = models.get_config("llama-tiny", checkpoint=strategy == "fpdt", chunked_mlp=strategy == "fpdt",
                            chunked_loss=strategy == "fpdt")  # fmt: skip
    B, S = 2, 48
    tokens = torch.randint(0, cfg.vocab_size, (B, S))
    labels = torch.randint(0, cfg.vocab_size, (B, S))
    cu = torch.tensor([0, 5, 17, 18, 48, 60, 96], dtype=torch.int32)  # row 1: documents of 12 and 36
    with fpdt_kernels.use_backend("torch"):
        reference = models.Transformer(cfg)
        want_loss, want_grads = _separate_documents(reference, tokens, labels, cu)
        model = models.Transformer(cfg)
        model.load_state_dict(reference.state_dict())
        model = parallelize(model, strategy, group=SPGroup.single(), chunks=chunks, offload=True, backward_order=order)
        t, lab, pos = shard_batch(tokens, labels, strategy, chunks=chunks, group=SPGroup.single(), cu_seqlens=cu)
        loss = model(t, labels=lab, positions=pos, cu_seqlens=cu)
        loss.backward()
    assert loss.item() == pytest.approx(want_loss, rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.distributed
def test_packed_training_agrees_across_strategies(tmp_path):
    """experiments.train on synthetic packed documents: one process and FPDT on 2 ranks (u=2)."""
    from test_training import _losses, _train

    docs = ["data.doc_len=40", "steps=3", "batch_size=2"]
    local, _ = _train(tmp_path, "local", "parallel=local", "gpus=1", *docs)
    fpdt, proc = _train(tmp_path, "fpdt", "parallel=fpdt", "chunks=2", "gpus=2", *docs)
    torch.testing.assert_close(_losses(fpdt), _losses(local), rtol=1e-5, atol=0)
    unpacked, _ = _train(tmp_path, "whole", "parallel=local", "gpus=1", "steps=3", "batch_size=2")
    assert _losses(unpacked) != _losses(local)  # the documents made a difference
