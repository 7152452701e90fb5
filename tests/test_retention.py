"""Each retention mechanism shows its effect on a small problem."""

import torch
import torch.nn.functional as F

from safe.retention import FisherPenalty, NullSpaceProjector, kl_distillation


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


def test_fisher_penalty_acts_on_parameters_that_move_vl_outputs_and_never_on_gates():
    torch.manual_seed(0)
    vl_weight = torch.nn.Parameter(torch.randn(3, 4))
    unused = torch.nn.Parameter(torch.randn(5))  # only the audio task uses it; VL likelihood ignores it
    gate = torch.nn.Parameter(torch.zeros(()))
    params = {"vl_weight": vl_weight, "unused": unused, "fusion.adapters.1.alpha": gate}
    penalty = FisherPenalty(params)
    assert "fusion.adapters.1.alpha" not in penalty.params
    assert penalty.penalty() == 0  # nothing estimated yet
    xs, ys = torch.randn(8, 4), torch.randint(0, 3, (8,))

    def nll(i):
        return lambda: F.cross_entropy((xs[i : i + 1] @ vl_weight.T) * (1 + gate), ys[i : i + 1])

    assert penalty.estimate(nll(i) for i in range(8)) == 8
    assert penalty.fisher["vl_weight"].abs().sum() > 0 and penalty.fisher["unused"].abs().sum() == 0
    assert penalty.penalty() == 0  # at the anchor: the state when the Fisher was taken
    with torch.no_grad():
        vl_weight.add_(0.1)
        unused.add_(0.1)
        gate.add_(0.5)
    value = penalty.penalty()
    value.backward()
    assert value > 0
    assert vl_weight.grad.abs().sum() > 0
    assert unused.grad is None or unused.grad.abs().sum() == 0
    assert gate.grad is None                                     # a gate is never pinned


class Classifier(torch.nn.Module):
    def __init__(self, width: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.hidden = torch.nn.Parameter(torch.randn(width, 8, generator=g) / 8**0.5)
        self.out = torch.nn.Parameter(torch.randn(5, width, generator=g) / width**0.5)

    def forward(self, x):
        return torch.tanh(x @ self.hidden.T) @ self.out.T


def _penalty_over_kl(width: int, normalise: bool = False) -> float:
    """½ΣF·δ² of a small random perturbation δ against the true mean KL(p_θ ‖ p_θ+δ) it estimates."""
    model = Classifier(width, seed=width)
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(256, 8, generator=g)
    with torch.no_grad():
        labels = torch.multinomial(torch.softmax(model(xs), -1), 1, generator=g)[:, 0]  # the true Fisher's labels
    penalty = FisherPenalty(params)
    penalty.estimate(lambda i=i: F.cross_entropy(model(xs[i:i + 1]), labels[i:i + 1], reduction="sum")
                     for i in range(len(xs)))
    if normalise:  # the old rule: F divided by its mean, so that sum(F) = number of parameters
        mean = torch.cat([f.flatten() for f in penalty.fisher.values()]).mean()
        penalty.fisher = {k: v / mean for k, v in penalty.fisher.items()}
    with torch.no_grad():
        before = torch.log_softmax(model(xs), -1)
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=g) * 0.02 * p.abs().mean())
        after = torch.log_softmax(model(xs), -1)
    kl = float((before.exp() * (before - after)).sum(-1).mean())
    return float(penalty.penalty().detach()) / kl


def test_fisher_weight_means_the_same_at_any_model_size():
    """The penalty estimates the VL answers' KL drift in nats, so its ratio to the real KL is ~1 for a small and a
    40x larger model; the old mean-normalised Fisher was off by the parameter count."""
    small, large = _penalty_over_kl(16), _penalty_over_kl(640)
    assert 0.5 < small < 2.0 and 0.5 < large < 2.0
    # Mean-normalised, the same perturbation "costs" tens of times its KL, by a factor set by mean(F), not by the
    # answers: a weight in those units means nothing that carries over between models.
    assert min(_penalty_over_kl(16, normalise=True), _penalty_over_kl(640, normalise=True)) > 10


def test_null_space_projection_removes_protected_component():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(10, 20))
    projector = NullSpaceProjector({"w": weight}, rank=4)
    protected = [torch.randn(10, 20) for _ in range(3)]
    for g in protected:
        projector.add({"w": g})
    assert projector.dimension == 3
    weight.grad = torch.randn(10, 20)
    original = weight.grad.clone()
    projector.project_gradients_()
    for g in protected:
        assert abs(float((weight.grad * g).sum())) < 1e-4 * float(g.norm() * original.norm())
    # Only the protected part is removed: the rest is kept, and projecting twice changes nothing more.
    assert weight.grad.norm() > 0.5 * original.norm()
    once = weight.grad.clone()
    projector.project_gradients_()
    torch.testing.assert_close(weight.grad, once, atol=1e-5, rtol=0)


def test_null_space_keeps_the_dominant_directions_and_rank_r_is_r():
    torch.manual_seed(1)
    weight = torch.nn.Parameter(torch.zeros(50))
    strong = torch.randn(2, 50)
    projector = NullSpaceProjector({"w": weight}, rank=2)
    for _ in range(20):  # many gradients mostly in a 2-D subspace, plus small noise
        projector.add({"w": (torch.randn(2) * 10) @ strong + 0.01 * torch.randn(50)})
    basis = projector.basis
    assert basis.shape == (2, 50)
    torch.testing.assert_close(basis @ basis.T, torch.eye(2), atol=1e-4, rtol=0)
    for row in strong:
        weight.grad = row.clone()
        projector.project_gradients_()
        assert weight.grad.norm() < 0.01 * row.norm()
    full = NullSpaceProjector({"w": weight}, rank=8)
    for _ in range(8):                                      # 8 independent per-sample gradients: rank 8, not 4
        full.add({"w": torch.randn(50)})
    assert full.dimension == 8


def test_gate_scalars_and_small_tensors_are_never_protected():
    params = {"fusion.adapters.1.alpha": torch.nn.Parameter(torch.zeros(())),
              "fusion.adapters.1.norm.bias": torch.nn.Parameter(torch.zeros(8)),
              "fusion.adapters.1.q.weight": torch.nn.Parameter(torch.zeros(8, 8))}
    projector = NullSpaceProjector(params, rank=8)
    assert projector.protected == ["fusion.adapters.1.q.weight"]
    for _ in range(20):
        projector.add({name: torch.randn(p.shape) for name, p in params.items()})
    assert projector.dimension == 8 < 64                  # never the whole space of any protected tensor


def test_applied_adamw_update_is_orthogonal_to_every_protected_direction():
    """The promise is on the parameter change of a real AdamW step (per-coordinate scaling + weight decay):
    projecting the gradient alone is not enough, projecting the update is."""
    def step(project_update: bool) -> float:
        torch.manual_seed(0)
        weights = {"a.weight": torch.nn.Parameter(torch.randn(16, 24)), "b.weight": torch.nn.Parameter(torch.randn(40))}
        projector = NullSpaceProjector(weights, rank=4)
        for _ in range(6):
            projector.add({name: torch.randn(p.shape) for name, p in weights.items()})
        optimizer = torch.optim.AdamW(list(weights.values()), lr=1e-2, weight_decay=0.1)
        worst = 0.0
        for _ in range(3):                                   # moments built up over a few steps
            for p in weights.values():
                p.grad = torch.randn(p.shape) * torch.linspace(0.1, 10, p.numel()).view(p.shape)
            projector.project_gradients_()
            before = {n: p.detach().clone() for n, p in weights.items()}
            if project_update:
                with projector.protected_update():
                    optimizer.step()
            else:
                optimizer.step()
            change = torch.cat([(p.detach() - before[n]).reshape(-1) for n, p in weights.items()])
            for u in projector.basis:
                worst = max(worst, abs(float(u @ change)) / float(change.norm()))
        return worst

    assert step(project_update=True) <= 1e-5
    assert step(project_update=False) > 1e-3               # the projected gradient alone leaks through AdamW


def test_a_null_space_basis_read_from_a_checkpoint_moves_to_the_parameters_device():
    # Checkpoints are read onto the CPU; a GPU run's gradients are on the GPU (here the meta device stands in for
    # it), and projecting them with a CPU basis would raise on the first step after a resume.
    saved = NullSpaceProjector({"w": torch.nn.Parameter(torch.zeros(4))}, rank=2)
    saved.add({"w": torch.tensor([1.0, 0.0, 2.0, 0.0])})
    resumed = NullSpaceProjector({"w": torch.nn.Parameter(torch.zeros(4, device="meta"))}, rank=2)
    resumed.load_state_dict(saved.state_dict())
    assert resumed.basis.device.type == "meta" and resumed.scales.device.type == "meta" and resumed.samples == 1
