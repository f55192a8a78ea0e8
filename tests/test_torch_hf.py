"""srkern.torch.AdamW on a Hugging Face ``transformers`` model: a tiny GPT-2 built from a config
(nothing downloaded; tied input/output embeddings; one frozen parameter), in BF16, trained in
``bf16-sr``, checkpointed through torch.save (model and optimizer state dicts) and resumed: bit for
bit the uninterrupted run."""
from __future__ import annotations


import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import srkern.torch as srt  # noqa: E402
from srkern.testing import assert_same_bits  # noqa: E402

from conftest import save_and_load  # noqa: E402

CONFIG = dict(n_layer=2, n_head=2, n_embd=64, vocab_size=256, n_positions=64, tie_word_embeddings=True,
              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # no dropout: the forward is deterministic
              bos_token_id=0, eos_token_id=0)
FROZEN = "transformer.wpe.weight"  # the position embeddings stay as initialised
STEPS, SAVE_AT = 6, 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # bit-exact against torch's CPU kernels


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(**CONFIG)
    model = transformers.GPT2LMHeadModel(cfg).to(torch.bfloat16)
    model.get_parameter(FROZEN).requires_grad_(False)
    return model


def optimizer(model, seed=7):
    return srt.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1,
                     precision="bf16-sr", seed=seed)


def tokens(t: int) -> torch.Tensor:
    # One fixed batch every step (t is unused): memorising it makes the loss fall within 6 steps.
    g = torch.Generator().manual_seed(100)
    return torch.randint(0, CONFIG["vocab_size"], (2, 16), generator=g)


def train(model, opt, steps) -> list[float]:
    losses = []
    for t in steps:
        opt.zero_grad()
        ids = tokens(t)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_gpt2_bf16_sr_checkpoint_resumes_bit_exact():
    # The tied embedding is one parameter (model.parameters() yields it once) and gets one update
    # per step from both uses; the frozen one has no gradient and no state and keeps its bits. The
    # resumed run (fresh model and optimizer, seed=None: the seed comes from the checkpoint)
    # matches the 6-step run in every weight and every optimizer tensor, and its losses match.
    model = gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight, "embeddings are not tied"
    frozen = model.get_parameter(FROZEN).detach().clone()
    ref_opt = optimizer(model)
    ref_losses = train(model, ref_opt, range(STEPS))
    assert ref_losses[-1] < ref_losses[0], f"loss did not fall: {ref_losses}"
    assert_same_bits(model.get_parameter(FROZEN), frozen, what="frozen parameter")
    assert model.get_parameter(FROZEN) not in ref_opt.state

    m1 = gpt2()
    o1 = optimizer(m1)
    first = train(m1, o1, range(SAVE_AT))
    ck = save_and_load({"model": m1.state_dict(), "optimizer": o1.state_dict()}, weights_only=True)

    m2 = gpt2()
    m2.load_state_dict(ck["model"])
    o2 = optimizer(m2, seed=None)
    o2.load_state_dict(ck["optimizer"])
    rest = train(m2, o2, range(SAVE_AT, STEPS))
    assert first + rest == ref_losses, f"losses {first + rest} vs {ref_losses}"
    assert m2.lm_head.weight is m2.transformer.wte.weight
    for (name, p), q in zip(model.named_parameters(), m2.parameters(), strict=True):
        assert_same_bits(q, p, what=f"resumed {name}")
        for k, v in ref_opt.state.get(p, {}).items():
            assert_same_bits(o2.state[q][k], v, what=f"resumed state of {name}[{k!r}]")
