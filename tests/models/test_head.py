"""The lean log-prob head (egm.models.head) against the plain full-logits path, in float64.

Log-probs, exact entropies and the gradient of every parameter must agree to a relative error of
1e-6 or less: on a bare head (chunk sizes 1, odd and larger than the tokens; temperature; tied
embeddings), on the tiny checkpoints of both families (with and without LoRA, with gradient
checkpointing), for SFT's cross-entropy against the model's own loss, and under DeepSpeed ZeRO-3
(partitioned head, one CPU process) against the plain path without DeepSpeed.
"""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
from PIL import Image
from reference_head import plain_token_logprobs

from egm.data.manifest import read_manifest
from egm.data.synthetic import make_synthetic
from egm.models import ADAPTERS, LoraSettings
from egm.models import head as head_module
from egm.models.head import chunked_logprobs, completion_logprobs, label_cross_entropy, masked_logprobs

REL = 1e-6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# -- the bare head ------------------------------------------------------------------------------

def _reference(h, W, tgt, T):
    logq = torch.log_softmax(h @ W.T / T, -1)
    return logq.gather(-1, tgt[:, None])[:, 0], -(logq.exp() * logq).sum(-1)


@pytest.mark.parametrize("chunk", [1, 7, 1000])  # one token, odd, more than the 37 tokens
@pytest.mark.parametrize("temperature", [1.0, 0.7])
# the backward's row blocks: the default (one block here), 3 rows (a shorter last block), 1 row
@pytest.mark.parametrize("block_elements", [None, 150, 1])
def test_chunks_equal_the_full_softmax_in_float64(chunk, temperature, block_elements, monkeypatch):
    if block_elements is not None:
        monkeypatch.setattr(head_module, "BACKWARD_BLOCK_ELEMENTS", block_elements)
        assert head_module.backward_block_rows(torch.zeros(37, 50)) == max(block_elements // 50, 1)
    g = torch.Generator().manual_seed(0)
    n, H, V = 37, 8, 50
    head = torch.nn.Linear(H, V, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g, dtype=torch.float64))
    h = torch.randn(n, H, generator=g, dtype=torch.float64, requires_grad=True)
    tgt = torch.randint(0, V, (n,), generator=g)
    w1, w2 = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)

    lp, ent = chunked_logprobs(h, head, tgt, temperature, with_entropy=True, chunk_tokens=chunk)
    ((lp * w1).sum() + (ent * w2).sum()).backward()
    W = head.weight.detach().clone().requires_grad_(True)
    h2 = h.detach().clone().requires_grad_(True)
    rlp, rent = _reference(h2, W, tgt, temperature)
    ((rlp * w1).sum() + (rent * w2).sum()).backward()
    assert lp.dtype == torch.float64
    assert rel_err(lp, rlp) < REL and rel_err(ent, rent) < REL
    assert rel_err(h.grad, h2.grad) < REL and rel_err(head.weight.grad, W.grad) < REL


def test_tied_embeddings_sum_both_gradients():
    """lm_head sharing the input embedding's weight (Qwen3-VL 2B/4B): the weight's gradient is the
    embedding's plus the head's, as with full logits."""
    g = torch.Generator().manual_seed(1)
    V, H, n = 40, 6, 11
    emb = torch.nn.Embedding(V, H).double()
    head = torch.nn.Linear(H, V, bias=False).double()
    head.weight = emb.weight
    ids, tgt = torch.randint(0, V, (n,), generator=g), torch.randint(0, V, (n,), generator=g)
    lp, ent = chunked_logprobs(torch.tanh(emb(ids)), head, tgt, 0.7, with_entropy=True, chunk_tokens=3)
    (lp.sum() - 0.1 * ent.sum()).backward()
    got = emb.weight.grad.clone()
    W = emb.weight.detach().clone().requires_grad_(True)
    rlp, rent = _reference(torch.tanh(W[ids]), W, tgt, 0.7)
    (rlp.sum() - 0.1 * rent.sum()).backward()
    assert rel_err(got, W.grad) < REL


def test_entropy_without_grad_and_masked_positions():
    g = torch.Generator().manual_seed(2)
    head = torch.nn.Linear(4, 9, bias=False).double()
    h = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    tgt = torch.randint(0, 9, (2, 3), generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    lp, ent = masked_logprobs(h, head, tgt, mask, with_entropy=True, entropy_grad=False, chunk_tokens=2)
    assert lp.requires_grad and not ent.requires_grad
    assert lp[0, 2] == 0 and lp[1, 1] == 0 and ent[1, 2] == 0  # unprojected positions
    rlp, rent = _reference(h.detach()[mask.bool()], head.weight.detach(), tgt[mask.bool()], 1.0)
    assert rel_err(lp[mask.bool()].detach(), rlp) < REL and rel_err(ent[mask.bool()], rent) < REL
    with torch.no_grad():  # the scoring passes: no graph, same numbers
        lp2, _ = masked_logprobs(h, head, tgt, mask, chunk_tokens=2)
        lp1, _ = masked_logprobs(h, head, tgt, mask, chunk_tokens=1)
    assert torch.equal(lp2, lp.detach())  # same chunks: bitwise
    torch.testing.assert_close(lp1, lp2, rtol=1e-14, atol=0)  # other chunks: BLAS may sum in another order


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_logprobs(torch.zeros(2, 3), torch.nn.Linear(3, 4), torch.zeros(2, dtype=torch.long), chunk_tokens=0)


# -- the tiny checkpoints of both families -------------------------------------------------------

@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    paths = make_synthetic(str(tmp_path_factory.getbasetemp() / "syn_head"), n_train=4, n_val=3, n_test=3,
                           image_size=64)
    return [{"sample": s, "image": Image.open(s.image).convert("RGB")} for s in read_manifest(paths["train"])[:3]]


def _batch(ad, examples, seed=0, t=6):
    """Prompts of different lengths (left-padded) + random completions of uneven lengths."""
    g = torch.Generator().manual_seed(seed)
    gen = ad.pad_batch([ad.collate_generate([ex]) for ex in examples], "left")
    comp = torch.randint(0, 200, (len(examples), t), generator=g)
    lengths = torch.tensor([t, 2, 4][:len(examples)])
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    return ad.with_completion(gen, comp, mask), comp, mask


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", ["qwen3_vl", "internvl"])
def test_completion_logprobs_equal_the_plain_path(tiny_dirs, examples, family, lora):
    ad = ADAPTERS[family](str(tiny_dirs[family]), gradient_checkpointing=True,
                          lora=LoraSettings(rank=4, alpha=8, dropout=0.0) if lora else None)
    torch.manual_seed(0)
    model = ad.load_model().double().train()
    if lora:  # LoRA B starts at 0: move it so the adapter changes the outputs
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    inputs, comp, mask = _batch(ad, examples)
    w = torch.randn(comp.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def loss(lp, ent):
        return ((lp * w + 0.3 * ent) * mask).sum()

    lp, ent = completion_logprobs(model, inputs, comp, mask, temperature=0.7, with_entropy=True, chunk_tokens=5)
    loss(lp, ent).backward()
    lean = _grads(model)
    model.zero_grad(set_to_none=True)
    rlp, rent = plain_token_logprobs(model, inputs, comp, temperature=0.7, with_entropy=True)
    loss(rlp, rent).backward()
    plain = _grads(model)
    m = mask.bool()
    assert rel_err(lp[m], rlp[m]) < REL and rel_err(ent[m], rent[m]) < REL
    assert lean.keys() == plain.keys() and len(lean) > 0
    if lora:
        assert all("lora_" in n for n in lean)
    worst = max(lean, key=lambda n: rel_err(lean[n], plain[n]))
    assert rel_err(lean[worst], plain[worst]) < REL, worst


@pytest.mark.parametrize("family", ["qwen3_vl", "internvl"])
def test_sft_label_cross_entropy_equals_the_models_loss(tiny_dirs, examples, family):
    ad = ADAPTERS[family](str(tiny_dirs[family]))
    model = ad.load_model().double().train()
    inputs = ad.collate_train(examples)
    loss, n = label_cross_entropy(model, inputs, chunk_tokens=3)
    loss.backward()
    lean = _grads(model)
    model.zero_grad(set_to_none=True)
    ref = model(**inputs).loss
    ref.backward()
    plain = _grads(model)
    assert int(n) == int((inputs["labels"][:, 1:] != -100).sum()) > 0
    assert abs(float(loss) - float(ref)) / float(ref) < REL
    worst = max(plain, key=lambda k: rel_err(lean[k], plain[k]))
    assert rel_err(lean[worst], plain[worst]) < REL, worst


# -- DeepSpeed ZeRO-3 (one CPU process, in a subprocess: it initialises a process group) ---------

def zero3_grads(ck: str, syn: str, out: str) -> None:
    """(Subprocess.) The lean head's gradients under ZeRO-3, every parameter partitioned, gathered
    with DeepSpeed's public ``safe_get_full_grad``."""
    import deepspeed
    import deepspeed.ops
    from deepspeed.utils import safe_get_full_grad

    from egm.strategies import SHM_COMM_OP

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False  # plain gloo, no C++ op to compile
    with socket.socket() as s:  # a world of one process on a free port
        s.bind(("127.0.0.1", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]), RANK="0", LOCAL_RANK="0",
                          WORLD_SIZE="1")
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    ad = ADAPTERS["qwen3_vl"](ck)
    exs = [{"sample": s, "image": Image.open(s.image).convert("RGB")} for s in read_manifest(syn)[:3]]
    inputs, comp, mask = _batch(ad, exs)
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
           "optimizer": {"type": "SGD", "params": {"lr": 0.0}}, "zero_allow_untested_optimizer": True}
    model = ad.load_model().train()  # deepspeed.initialize partitions it (stage 3)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    assert all(p.numel() == 0 for p in engine.module.parameters())  # partitioned outside the hooks
    lp, ent = completion_logprobs(engine.module, inputs, comp, mask, temperature=0.7, with_entropy=True,
                                  chunk_tokens=5)
    engine.backward(((lp + 0.3 * ent) * mask).sum())
    grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
    torch.save({"logp": lp.detach(), "grads": grads}, out)


def test_zero3_partitioned_head_gives_the_plain_gradients(tiny_dirs, examples, tmp_path, tmp_path_factory):
    from multirank import launch

    ck = str(tiny_dirs["qwen3_vl"])
    syn = str(tmp_path_factory.getbasetemp() / "syn_head" / "train.jsonl")
    launch(__file__, "zero3_grads", ck, syn, str(tmp_path / "z3.pt"), timeout=300)
    got = torch.load(tmp_path / "z3.pt")
    ad = ADAPTERS["qwen3_vl"](ck)
    model = ad.load_model().train()
    inputs, comp, mask = _batch(ad, examples)
    rlp, rent = plain_token_logprobs(model, inputs, comp, temperature=0.7, with_entropy=True)
    (((rlp + 0.3 * rent) * mask).sum()).backward()
    m = mask.bool()
    assert rel_err(got["logp"][m], rlp.detach()[m]) < 1e-5
    for n, p in model.named_parameters():
        assert rel_err(got["grads"][n], p.grad) < 1e-4, n  # float32, summed in another order


if __name__ == "__main__":
    {"zero3_grads": zero3_grads}[sys.argv[1]](*sys.argv[2:])
