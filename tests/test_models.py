"""Claims of models.py: exact parameter counts, the stem/blocks/tail layout, LLaMA equivalence."""
import pytest
import torch
import torchvision

import models


def wrn_params_closed_form(depth, width, num_classes, in_channels=3):
    """Zagoruyko & Komodakis WRN-d-k, pre-activation blocks, counted by hand."""
    n = (depth - 4) // 6
    w = [16, 16 * width, 32 * width, 64 * width]
    total = in_channels * 16 * 9  # stem conv
    for s in range(3):
        c_in, c = w[s], w[s + 1]
        # first block: BN(c_in), conv c_in->c, BN(c), conv c->c, 1x1 shortcut if shapes change
        total += 2 * c_in + 9 * c_in * c + 2 * c + 9 * c * c + (c_in * c if s > 0 or c_in != c else 0)
        total += (n - 1) * (2 * c + 9 * c * c + 2 * c + 9 * c * c)
    return total + 2 * w[3] + w[3] * num_classes + num_classes  # final BN + fc


def count(net):
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("depth,width,classes", [(28, 10, 100), (16, 4, 10), (10, 1, 7)])
def test_wrn_parameter_count_matches_closed_form(depth, width, classes):
    with torch.device("meta"):
        net = models.build(f"wrn{depth}-{width}", num_classes=classes)
    assert count(net) == wrn_params_closed_form(depth, width, classes)
    assert len(net.blocks) == 3 * (depth - 4) // 6


def test_wrn28_10_is_the_36_5m_network():
    # the widely quoted WRN-28-10 CIFAR-10 count; CIFAR-100 adds 90 x (640 + 1) fc parameters
    with torch.device("meta"):
        assert count(models.build("wrn28-10", num_classes=10)) == 36_479_194
        assert count(models.build("wrn28-10", num_classes=100)) == 36_479_194 + 90 * 641


def test_resnet50_matches_torchvision_parameter_count_and_outputs():
    net = models.build("resnet50", num_classes=1000)
    tv = torchvision.models.resnet50(weights=None)
    assert count(net) == count(tv) == 25_557_032
    assert len(net.blocks) == 16
    # same modules, same function: load torchvision's weights by position and compare outputs
    with torch.no_grad():
        for p, q in zip(net.parameters(), tv.parameters()):
            p.copy_(q)
        net.eval(), tv.eval()
        x = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(net(x), tv(x), rtol=0, atol=0)


def test_cifar_resnet18_layout():
    net = models.build("resnet18", num_classes=10)
    assert len(net.blocks) == 8
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert 11_000_000 < count(net) < 11_300_000


@pytest.mark.parametrize("name,layers,hidden,ffn,heads", [
    ("llama-130m", 12, 768, 2048, 12), ("llama-350m", 24, 1024, 2736, 16)])
def test_llama_configs_are_the_papers(name, layers, hidden, ffn, heads):
    with torch.device("meta"):
        net = models.build(name)
    assert len(net.blocks) == layers
    attn = net.blocks[0].layer.self_attn
    assert attn.q_proj.weight.shape == (hidden, hidden)
    assert attn.config.num_attention_heads == heads
    assert net.blocks[0].layer.mlp.gate_proj.weight.shape == (ffn, hidden)
    assert net.stem.weight.shape == (32000, hidden)
    assert net.tail[1].weight.shape == (32000, hidden)  # untied lm_head
    assert net.tail[1].weight is not net.stem.weight


def test_llama_250m_is_the_parameter_matched_baseline_size():
    with torch.device("meta"):
        assert round(count(models.build("llama-250m")) / 1e4) / 100 == 247.37  # App. H.1: 247.37M


def test_llama_splitnet_equals_hf_causal_lm():
    torch.manual_seed(0)
    net = models.llama("llama-9m", vocab_size=100)
    from transformers import LlamaConfig, LlamaForCausalLM
    layers, hidden, ffn, heads = models.LLAMA_CONFIGS["llama-9m"]
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=hidden, intermediate_size=ffn,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      rms_norm_eps=1e-6, tie_word_embeddings=False))
    hf.load_state_dict({"model.embed_tokens.weight": net.stem.weight,
                        **{f"model.layers.{i}.{k}": v for i, b in enumerate(net.blocks)
                           for k, v in b.layer.state_dict().items()},
                        "model.norm.weight": net.tail[0].weight, "lm_head.weight": net.tail[1].weight})
    ids = torch.randint(0, 100, (2, 17))
    net.eval(), hf.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)
        # causal: changing a later token leaves earlier logits unchanged
        ids2 = ids.clone()
        ids2[:, 10] = (ids2[:, 10] + 1) % 100
        torch.testing.assert_close(net(ids2)[:, :10], net(ids)[:, :10], rtol=0, atol=0)


def test_unknown_model_names_the_flag():
    with pytest.raises(ValueError, match="--model: unknown model 'vgg16'"):
        models.build("vgg16")
