"""One-pass per-example squared gradient norms (batchscope.core.per_example) against vmap(grad) as the reference.

The reference materialises every per-example gradient (noise.per_example_grads) and squares it. In float64 the two
agree to rounding: rtol 1e-9 (the one-pass path sums in another order, explicit matrices or Gram matrices); in
float32, rtol 1e-4.
"""

import pytest
import torch
from torch import nn

from batchscope.core import noise, per_example
from batchscope.workloads.models import build_model

CE = nn.functional.cross_entropy
# torch's notes on its own kernels (vmap has no batching rule for CPU flash attention; an even "same" kernel pads
# a copy), not on this code
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop", "ignore:Using padding='same'")
RTOL64, RTOL32 = 1e-9, 1e-4


def reference(model, x, y):
    return (noise.per_example_grads(model, CE, x, y) ** 2).sum(1)


def check(model, x, y, rtol=RTOL64):
    assert per_example.supported(model)
    fast = per_example.sq_norms(model, CE, x, y)
    torch.testing.assert_close(fast, reference(model, x, y), rtol=rtol, atol=0)
    assert all(p.grad is None for p in model.parameters())  # state restored
    return fast


def randomise_norms(model):
    """Affine weights and running statistics away from their 1/0 defaults, so each term is exercised."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.uniform_(0.5, 1.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.normal_()
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1),  # bias
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(inplace=True),  # modifies the BatchNorm's output in place
        nn.Conv2d(6, 8, 3, stride=2, padding=2, dilation=2, padding_mode="reflect"),  # 2 x 2 out: the Gram route
        nn.Flatten(),
        nn.LayerNorm(8 * 2 * 2),
        nn.Linear(32, 5),
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cnn_with_group_batch_and_layer_norm(dtype):
    torch.manual_seed(0)
    model = randomise_norms(small_cnn()).to(dtype).eval()
    x, y = torch.randn(12, 3, 8, 8, dtype=dtype), torch.randint(0, 5, (12,))
    check(model, x, y, RTOL64 if dtype == torch.float64 else RTOL32)


def test_conv1d_groups_circular_and_same_padding():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2, padding_mode="circular"),
        nn.ReLU(),
        nn.Conv1d(6, 6, 4, padding="same", bias=False),  # even kernel: one more zero on the right; Gram route
        nn.GroupNorm(3, 6),
        nn.Conv1d(6, 6, 1, groups=6),  # depthwise
        nn.BatchNorm1d(6),
        nn.Flatten(),
        nn.Linear(6 * 4, 3),
    )
    model = randomise_norms(model).double().eval()
    check(model, torch.randn(10, 4, 10, dtype=torch.float64), torch.randint(0, 3, (10,)))


class Block(nn.Module):
    """A GPT-style block from nn.Linear layers: causal self-attention and an MLP, pre-LayerNorm, on (N, T, D)."""

    def __init__(self, d: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d, bias=False)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=b) for b in (True, False, True, True))
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        n, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (f(h).view(n, t, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(att.transpose(1, 2).reshape(n, t, d))
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, d: int, t: int, classes: int):
        super().__init__()
        self.embed, self.position = nn.Embedding(vocab, d, padding_idx=0), nn.Embedding(t, d)
        self.block = Block(d)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):
        x = self.embed(tokens) + self.position(torch.arange(tokens.shape[1]).expand_as(tokens))
        return self.head(self.block(x).mean(1))


@pytest.mark.parametrize(("t", "d", "vocab"), [(3, 16, 50), (24, 4, 7)])
def test_attention_block_from_linear_layers_and_embeddings(t, d, vocab):
    """(3, 16): every Linear takes the Gram route, T (I + O) < I O, and the token Embedding too (T^2 < V);
    (24, 4): the explicit route for all of them, and the Embedding scatters into rows."""
    torch.manual_seed(2)
    model = randomise_norms(TinyGPT(vocab, d, t, 3)).double()
    tokens = torch.randint(0, vocab, (9, t))
    tokens[0, :2] = 0  # padding rows get no gradient
    check(model, tokens, torch.randint(0, 3, (9,)))


def test_linear_on_sequences_and_rms_norm():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 7), nn.RMSNorm(7), nn.Tanh(), nn.Linear(7, 2), nn.Flatten(), nn.Linear(8, 3))
    check(model.double(), torch.randn(11, 4, 5, dtype=torch.float64), torch.randint(0, 3, (11,)))


class Shared(nn.Module):
    """One Linear and one LayerNorm used twice in the forward pass: their gradients sum over the two calls."""

    def __init__(self):
        super().__init__()
        self.layer, self.norm, self.head = nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.norm(self.layer(torch.tanh(self.norm(self.layer(x))))))


def test_shared_layers_pool_their_calls():
    torch.manual_seed(4)
    check(randomise_norms(Shared()).double(), torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,)))


@pytest.mark.parametrize("norm", ["batch", "ghost", "none"])
def test_project_resnet(norm):
    """batchscope.workloads.models' ResNet (norm layers in eval mode): per example, and summed over the examples."""
    torch.manual_seed(5)
    spec = {"name": "resnet", "widths": [4, 8], "blocks": 1, "norm": norm, "ghost_batch_size": 4}
    model = randomise_norms(build_model(spec, (3, 8, 8), 10)).double().eval()
    x, y = torch.randn(10, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (10,))
    fast = check(model, x, y)
    assert float(fast.sum()) == pytest.approx(float(reference(model, x, y).sum()), rel=RTOL64)


def test_batchnorm_in_train_mode_is_refused():
    model = build_model({"name": "resnet", "widths": [4], "blocks": 1, "norm": "batch"}, (3, 8, 8), 10).train()
    assert per_example.supported(model)  # by layer type; the mode is checked when the norms are asked for
    with pytest.raises(ValueError, match="train mode"):
        per_example.sq_norms(model, CE, torch.randn(4, 3, 8, 8), torch.arange(4))
    assert all(p.grad is None for p in model.parameters())
    plain = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, affine=False), nn.Linear(4, 2))  # BN has no parameters
    with pytest.raises(ValueError, match="train mode"):
        per_example.sq_norms(plain.train(), CE, torch.randn(4, 3), torch.arange(4) % 2)
    model[1].eval()
    model[1].track_running_stats, model[1].running_mean, model[1].running_var = False, None, None
    with pytest.raises(ValueError, match="without running statistics"):
        per_example.sq_norms(model.eval(), CE, torch.randn(4, 3, 8, 8), torch.arange(4))


class Scaled(nn.Module):
    """A custom module with a parameter of its own."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.scale[:, None, None]


class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attention, self.head = nn.MultiheadAttention(d, 2, batch_first=True), nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.attention(x, x, x, need_weights=False)[0].mean(1))


@pytest.mark.parametrize(
    ("model", "shape"),
    [(Attention(4), (7, 3, 4)), (nn.Sequential(nn.Conv2d(2, 3, 3), Scaled(3), nn.Flatten(), nn.Linear(12, 3)),
                                 (7, 2, 4, 4))],
)  # fmt: skip
def test_unsupported_modules_fall_back_to_vmap(model, shape):
    torch.manual_seed(6)
    model = model.double()
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],))
    assert not per_example.supported(model)
    with pytest.raises(per_example.Unsupported):
        per_example.sq_norms(model, CE, x, y)
    torch.testing.assert_close(noise.per_example_sq_norms(model, CE, x, y), reference(model, x, y), rtol=0, atol=0)
    assert noise.noise_scale(model, CE, x, y).method == "per-example (vmap)"


class SequenceFirst(nn.Module):
    """A Linear on (T, N, D): the hooks cannot see which dimension holds the examples. (The LayerNorm keeps the
    model from being all-Linear, whose "linear" path assumes the examples first without checking.)"""

    def __init__(self):
        super().__init__()
        self.norm, self.layer = nn.LayerNorm(4), nn.Linear(4, 3)

    def forward(self, x):
        return self.layer(self.norm(x).transpose(0, 1)).mean(0)


def test_a_layer_without_the_example_dimension_first_falls_back_to_vmap():
    torch.manual_seed(7)
    model = SequenceFirst().double()
    x, y = torch.randn(6, 5, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    assert per_example.supported(model)
    with pytest.raises(per_example.Unsupported, match="example dimension first"):
        per_example.sq_norms(model, CE, x, y)
    torch.testing.assert_close(noise.per_example_sq_norms(model, CE, x, y), reference(model, x, y), rtol=0, atol=0)
    assert noise.noise_scale(model, CE, x, y).method == "per-example (vmap)"


def test_noise_scale_uses_the_one_pass_path():
    torch.manual_seed(8)
    model = randomise_norms(small_cnn()).double().eval()
    x, y = torch.randn(16, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (16,))
    hooks = noise.noise_scale(model, CE, x, y)
    vmap = noise.noise_scale(model, CE, x, y, method="vmap")
    assert (hooks.method, vmap.method) == ("per-example (hooks)", "per-example (vmap)")
    assert hooks.trace_sigma == pytest.approx(vmap.trace_sigma, rel=RTOL64)
    chunked = noise.per_example_sq_norms(model, CE, x, y, chunk=5, method="hooks")
    torch.testing.assert_close(chunked, reference(model, x, y), rtol=RTOL64, atol=0)


def test_all_linear_models_keep_the_linear_path():
    torch.manual_seed(9)
    model = build_model({"name": "mlp", "widths": [9, 5]}, (6,), 4).double()
    x, y = torch.randn(13, 6, dtype=torch.float64), torch.randint(0, 4, (13,))
    assert noise.noise_scale(model, CE, x, y).method == "per-example (linear)"
    linear = noise.per_example_sq_norms(model, CE, x, y)
    torch.testing.assert_close(linear, noise.per_example_sq_norms(model, CE, x, y, method="linear"), rtol=0, atol=0)
    torch.testing.assert_close(check(model, x, y), linear, rtol=RTOL64, atol=0)
