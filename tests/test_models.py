import pytest
import torch
import torch.nn.functional as F

from fastgrad.models.llama import (
    CONFIGS,
    LlamaConfig,
    LlamaForCausalLM,
    _rope_tables,
    apply_rotary,
    get_config,
    num_parameters,
)

VOCAB = 97


def small_config(**overrides) -> LlamaConfig:
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, max_seq_len=32)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def make_model(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(small_config(**overrides))


def test_named_configs():
    assert set(CONFIGS) == {"tiny", "60m", "130m", "350m", "1b", "7b"}
    c = get_config("LLaMA-7B", vocab_size=32000)
    assert (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads) == (4096, 11008, 32, 32)
    assert c.num_kv_heads == 32 and c.max_seq_len == 256 and c.vocab_size == 32000
    assert get_config("60m", 100, max_seq_len=1024).max_seq_len == 1024
    with pytest.raises(ValueError, match="known: tiny, 60m"):
        get_config("llama-3b", 100)


def test_parameter_count_matches_llama_7b():
    with torch.device("meta"):
        model = LlamaForCausalLM(get_config("7b", vocab_size=32000))
    assert num_parameters(model) == 6_738_415_616  # the published LLaMA-7B count


def test_parameter_names_for_target_selection():
    model = make_model()
    names = {name for name, _ in model.named_parameters()}
    for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"):
        assert f"model.layers.1.{proj}.weight" in names
    for proj in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"):
        assert f"model.layers.0.{proj}.weight" in names
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= names
    assert not any(name.endswith("bias") for name in names)
    assert model.model.rotary.cos.shape == (32, 8)
    assert "model.rotary.cos" not in model.state_dict()


def test_init():
    model = make_model(initializer_range=0.05)
    assert torch.all(model.model.layers[0].input_layernorm.weight == 1)
    std = model.model.layers[0].mlp.up_proj.weight.std().item()
    assert 0.045 < std < 0.055


def test_tied_embeddings():
    tied = make_model(tie_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert num_parameters(make_model()) - num_parameters(tied) == VOCAB * 32


def test_forward_shapes_and_loss_matches_manual_cross_entropy():
    model = make_model()
    ids = torch.randint(0, VOCAB, (3, 16))
    logits = model(ids)
    assert logits.shape == (3, 16, VOCAB) and logits.dtype == torch.float32
    manual = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(model(ids, labels=ids), manual)
    targets = torch.randint(0, VOCAB, (3, 16))
    unshifted = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
    torch.testing.assert_close(model(ids, labels=targets, shift_labels=False), unshifted)
    masked = targets.clone()
    masked[:, :8] = -100
    kept = F.cross_entropy(logits[:, 8:].reshape(-1, VOCAB), targets[:, 8:].reshape(-1))
    torch.testing.assert_close(model(ids, labels=masked, shift_labels=False), kept)


def test_causal_masking():
    model = make_model()
    ids = torch.randint(0, VOCAB, (2, 20))
    changed = ids.clone()
    changed[:, 12] = (ids[:, 12] + 1) % VOCAB
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = _rope_tables(head_dim=16, max_seq_len=64, theta=10000.0)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    # Put q and k at every position; score(m, n) = <rot(q, m), rot(k, n)>.
    qs = apply_rotary(q.expand(1, 1, 64, 16), cos, sin)[0, 0]
    ks = apply_rotary(k.expand(1, 1, 64, 16), cos, sin)[0, 0]
    scores = qs @ ks.T
    for offset in (0, 3, 17):
        torch.testing.assert_close(scores[5 + offset, 2 + offset], scores[5, 2], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(scores[5, 2], scores[5, 3])
    torch.testing.assert_close(qs.norm(dim=-1), q.norm().expand(64).to(qs.dtype))


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = make_model(num_kv_heads=2)
    attn = gqa.model.layers[0].self_attn
    assert attn.k_proj.weight.shape == (2 * 8, 32) and attn.v_proj.weight.shape == (16, 32)
    mha = make_model(seed=1)
    state = gqa.state_dict()
    for name, tensor in state.items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            # kv head j serves query heads 2j and 2j + 1.
            state[name] = tensor.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    ids = torch.randint(0, VOCAB, (2, 16))
    torch.testing.assert_close(gqa(ids), mha(ids))


def test_gradient_checkpointing_gives_same_gradients():
    ids = torch.randint(0, VOCAB, (2, 16))
    grads = []
    for checkpointing in (False, True):
        model = make_model()
        model.gradient_checkpointing = checkpointing
        assert model.model.gradient_checkpointing is checkpointing
        model(ids, labels=ids).backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_bf16_forward_and_backward():
    model = make_model().to(torch.bfloat16)
    assert model.model.rotary.cos.dtype == torch.float32  # angle tables are not rounded to bf16
    ids = torch.randint(0, VOCAB, (2, 16))
    assert model(ids).dtype == torch.bfloat16
    loss = model(ids, labels=ids)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert model.lm_head.weight.grad.dtype == torch.bfloat16
    reference = make_model()(ids, labels=ids)
    torch.testing.assert_close(loss, reference, atol=0.05, rtol=0)


def test_sequence_longer_than_max_seq_len_raises():
    with pytest.raises(ValueError, match="max_seq_len=32"):
        make_model()(torch.zeros(1, 33, dtype=torch.long))


def test_invalid_config():
    with pytest.raises(ValueError, match="num_kv_heads"):
        small_config(num_kv_heads=3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_matches_cpu():
    cpu = make_model()
    ids = torch.randint(0, VOCAB, (2, 32))
    model = make_model().to("cuda", torch.bfloat16)
    model.gradient_checkpointing = True
    assert model.model.rotary.cos.device.type == "cuda" and model.model.rotary.cos.dtype == torch.float32
    loss = model(ids.cuda(), labels=ids.cuda())
    loss.backward()
    torch.testing.assert_close(loss.cpu(), cpu(ids, labels=ids), atol=0.05, rtol=0)
