"""Each retention mechanism shows its effect on a small problem (DESIGN §5)."""

import torch
import torch.nn.functional as F

from safe.training.retention import FisherPenalty, NullSpaceProjector, kl_distillation


class GatedToy(torch.nn.Module):
    """Frozen base logits W0·x plus a gated audio path tanh(α)·U·a, which starts exactly at the base."""

    def __init__(self, dim=6, audio_dim=4, vocab=5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.base = torch.nn.Parameter(torch.randn(vocab, dim, generator=g), requires_grad=False)
        self.up = torch.nn.Parameter(torch.randn(vocab, audio_dim, generator=g) * 0.1)
        self.alpha = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, audio=None):
        logits = x @ self.base.T
        if audio is not None:
            logits = logits + torch.tanh(self.alpha) * (audio @ self.up.T)
        return logits


def _train(kl_weight, steps=150, seed=0):
    torch.manual_seed(seed)
    model = GatedToy()
    opt = torch.optim.Adam([model.up, model.alpha], lr=0.05)
    audio_feats = torch.randn(64, 4)
    audio_labels = audio_feats[:, :2].argmax(dim=1)  # the audio task depends on the audio
    vl_x = torch.randn(64, 6)
    for _ in range(steps):
        loss = F.cross_entropy(model(torch.zeros(64, 6), audio_feats), audio_labels)
        if kl_weight:
            distractor = audio_feats[torch.randperm(64)]
            with torch.no_grad():
                teacher = model(vl_x)  # gate 0 / no audio: the base
            loss = loss + kl_weight * kl_distillation(model(vl_x, distractor), teacher, torch.ones(64))
        opt.zero_grad()
        loss.backward()
        opt.step()
    test_x, test_audio = torch.randn(128, 6), torch.randn(128, 4)
    with torch.no_grad():
        distractor_kl = kl_distillation(model(test_x, test_audio), model(test_x), torch.ones(128), 1.0)
        audio_acc = (model(torch.zeros(64, 6), audio_feats).argmax(1) == audio_labels).float().mean()
    return float(distractor_kl), float(audio_acc)


def test_kl_is_zero_for_identical_logits_and_masked():
    logits = torch.randn(2, 3, 7)
    assert kl_distillation(logits, logits, torch.ones(2, 3)) == 0
    other = logits.clone()
    other[:, 0] += torch.randn(2, 7)
    mask = torch.tensor([[0, 1, 1], [0, 1, 1]])
    assert kl_distillation(other, logits, mask) == 0  # only unmasked positions differ
    assert kl_distillation(other, logits, torch.ones(2, 3)) > 0


def test_kl_distillation_lowers_distractor_kl():
    kl_without, acc_without = _train(kl_weight=0.0)
    kl_with, acc_with = _train(kl_weight=5.0)
    assert kl_without > 0.05
    assert kl_with < 0.5 * kl_without
    assert acc_with > 0.6 and acc_without > 0.6  # the audio task is still learnt


def test_fisher_penalty_acts_on_parameters_that_move_vl_outputs():
    torch.manual_seed(0)
    vl_weight = torch.nn.Parameter(torch.randn(3, 4))
    unused = torch.nn.Parameter(torch.randn(5))  # only the audio task uses it; VL likelihood ignores it
    params = {"vl_weight": vl_weight, "unused": unused}
    penalty = FisherPenalty(params)
    assert penalty.penalty() == 0  # nothing estimated yet
    xs, ys = torch.randn(8, 4), torch.randint(0, 3, (8,))

    def nll(i):
        return lambda: F.cross_entropy((xs[i : i + 1] @ vl_weight.T), ys[i : i + 1])

    assert penalty.estimate(nll(i) for i in range(8)) == 8
    assert penalty.fisher["vl_weight"].abs().sum() > 0 and penalty.fisher["unused"].abs().sum() == 0
    all_fisher = torch.cat([f.flatten() for f in penalty.fisher.values()])
    assert torch.isclose(all_fisher.mean(), torch.tensor(1.0))  # mean-normalised
    assert penalty.penalty() == 0  # still at the anchor
    with torch.no_grad():
        vl_weight.add_(0.1)
        unused.add_(0.1)
    value = penalty.penalty()
    value.backward()
    assert value > 0
    assert vl_weight.grad.abs().sum() > 0
    assert unused.grad is None or unused.grad.abs().sum() == 0


def test_null_space_projection_removes_protected_component():
    torch.manual_seed(0)
    protected = [torch.randn(10, 20) for _ in range(3)]
    projector = NullSpaceProjector(rank=4)
    for g in protected:
        projector.add({"w": g})
    audio = {"w": torch.randn(10, 20)}
    original = audio["w"].clone()
    projector.project_(audio)
    for g in protected:
        assert abs(float((audio["w"] * g).sum())) < 1e-4 * float(g.norm() * original.norm())
    # Only the protected part is removed: the rest is kept, and projecting twice changes nothing more.
    assert audio["w"].norm() > 0.5 * original.norm()
    again = {"w": audio["w"].clone()}
    projector.project_(again)
    torch.testing.assert_close(again["w"], audio["w"], atol=1e-5, rtol=0)


def test_null_space_streaming_keeps_the_dominant_directions_within_rank():
    torch.manual_seed(1)
    strong = torch.randn(2, 50)
    projector = NullSpaceProjector(rank=2)
    for _ in range(20):  # many gradients mostly in a 2-D subspace, plus small noise
        coefficients = torch.randn(2) * 10
        projector.add({"w": coefficients @ strong + 0.01 * torch.randn(50)})
    assert projector.bases["w"].shape == (2, 50)
    basis = projector.bases["w"]
    torch.testing.assert_close(basis @ basis.T, torch.eye(2), atol=1e-4, rtol=0)
    for row in strong:
        residual = {"w": row.clone()}
        projector.project_(residual)
        assert residual["w"].norm() < 0.01 * row.norm()
