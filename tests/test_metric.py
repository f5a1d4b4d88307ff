"""ProtoNet and R2-D2 heads (issue 18, items 1-2): hand-derived and float64 second implementations."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robust_meta as rm
from robust_meta.metric import ProtoNetHead, R2D2Head, class_means
from robust_meta.params import call_model


class Embed(nn.Module):
    """A small body with a linear classifier, forward_features/forward_head like robust-meta's models."""

    def __init__(self, d: int = 6, ways: int = 3, bn: bool = False):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, d), *( [nn.BatchNorm1d(d)] if bn else []), nn.Tanh())
        self.classifier = nn.Linear(d, ways)

    def forward_features(self, x):
        return self.body(x)

    def forward_head(self, f):
        return self.classifier(f)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def task(ways=3, shots=2, queries=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(ways * shots, 1, 4, 4, generator=g, dtype=dtype)
    qx = torch.rand(ways * queries, 1, 4, 4, generator=g, dtype=dtype)
    return sx, torch.arange(ways).repeat(shots), qx, torch.arange(ways).repeat(queries)


def model64(**kw):
    torch.manual_seed(0)
    return Embed(**kw).double()


# ----------------------------------------------------------------------------- ProtoNet
def test_prototype_logits_are_negative_squared_distances_up_to_a_per_query_constant():
    model = model64()
    sx, sy, qx, qy = task()
    params = ProtoNetHead(model).adapt(sx, sy)
    logits = call_model(model, qx, params)
    fs, fq = model.forward_features(sx), model.forward_features(qx)
    protos = torch.stack([fs[sy == k].mean(0) for k in range(3)])  # by hand, class by class
    neg_d2 = -((fq[:, None, :] - protos[None]) ** 2).sum(-1)
    # logits = -||f - c||^2 + ||f||^2: the same softmax
    torch.testing.assert_close(logits, neg_d2 + (fq * fq).sum(1, keepdim=True), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(F.softmax(logits, 1), F.softmax(neg_d2, 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(class_means(fs, sy, 3), protos)


def test_the_meta_gradient_flows_through_the_prototypes_into_the_body():
    model = model64()
    sx, sy, qx, qy = task()
    params = ProtoNetHead(model).adapt(sx, sy)
    loss = F.cross_entropy(call_model(model, qx, params), qy)
    body = [p for n, p in model.named_parameters() if n.startswith("body")]
    got = torch.autograd.grad(loss, body)
    # second implementation: the distances written out
    fs, fq = model.forward_features(sx), model.forward_features(qx)
    protos = torch.stack([fs[sy == k].mean(0) for k in range(3)])
    ref_loss = F.cross_entropy(-torch.cdist(fq, protos) ** 2, qy)
    want = torch.autograd.grad(ref_loss, body)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    # the linear head's own weights are not used
    assert torch.autograd.grad(loss, model.classifier.weight, allow_unused=True)[0] is None


def test_robust_protonet_at_gamma_zero_is_the_clean_loss_and_attacks_see_constants():
    model = model64()
    sx, sy, qx, qy = task()
    proto = ProtoNetHead(model)
    params = proto.adapt(sx, sy)
    clean = F.cross_entropy(call_model(model, qx, params), qy)
    zero = rm.RobustMetaUpdate(F.cross_entropy, model, attack="fgsm", eps=0.1, gamma_out=0)(qx, qy, params=params)
    assert torch.equal(zero, clean)
    robust = rm.RobustMetaUpdate(F.cross_entropy, model, attack="pgd", eps=0.1, gamma_out=1.0, attack_steps=3)
    total = robust(qx, qy, params=params)
    adv = rm.perturb("pgd", model, qx, qy, params=params, eps=0.1, steps=3)
    assert not adv.requires_grad and float((adv - qx).abs().max()) <= 0.1
    body = [p for n, p in model.named_parameters() if n.startswith("body")]
    assert all(g is not None and torch.isfinite(g).all() for g in torch.autograd.grad(total, body))


def test_fewer_ways_than_outputs_leave_the_extra_classes_out_of_the_softmax():
    model = model64(ways=5)
    sx, sy, qx, qy = task(ways=3)
    params = ProtoNetHead(model).adapt(sx, sy)
    probs = F.softmax(call_model(model, qx, params), 1)
    assert float(probs[:, 3:].detach().max()) == 0.0
    small = model64(ways=3)
    small.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("classifier")}, strict=False)
    torch.testing.assert_close(probs[:, :3], F.softmax(call_model(small, qx, ProtoNetHead(small).adapt(sx, sy)), 1))


def test_cosine_prototypes_use_a_learnable_temperature():
    model = model64()
    sx, sy, qx, qy = task()
    proto = ProtoNetHead(model, distance="cosine", temperature=5.0)
    params = proto.adapt(sx, sy)
    fq = model.forward_features(qx)
    protos = class_means(model.forward_features(sx), sy, 3)
    torch.testing.assert_close(call_model(model, qx, params), 5.0 * fq @ F.normalize(protos, dim=1).t())
    loss = F.cross_entropy(call_model(model, qx, params), qy)
    (g,) = torch.autograd.grad(loss, proto.temperature)
    assert proto.parameters() == [proto.temperature] and torch.isfinite(g)


@pytest.mark.parametrize("bad, match", [
    (lambda: ProtoNetHead(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), head="classifier"), "no submodule"),
    (lambda: ProtoNetHead(model64(), distance="manhattan"), "distance"),
])
def test_bad_heads_are_clear_errors(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bad()


def test_support_labels_must_cover_the_ways_and_fit_the_classifier():
    model = model64()
    sx, sy, qx, qy = task()
    proto = ProtoNetHead(model)
    with pytest.raises(ValueError, match=r"classes \[1\] have no support"):
        proto.adapt(sx, torch.where(sy == 1, torch.zeros_like(sy), sy))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        proto.adapt(sx, sy + 1)


# ----------------------------------------------------------------------------- R2-D2
@pytest.mark.parametrize("d, shots", [(6, 1), (6, 4)], ids=["woodbury-n<D", "primal-n>D"])
def test_ridge_closed_form_equals_a_direct_solve(d, shots):
    model = model64(d=d)
    sx, sy, qx, qy = task(shots=shots)
    head = R2D2Head(model, lam=0.7, scale=2.0, bias=0.3).double()
    x = model.forward_features(sx)
    y = F.one_hot(sy, 3).double()
    direct = torch.linalg.solve(x.t() @ x + 0.7 * torch.eye(d, dtype=torch.float64), x.t() @ y)
    torch.testing.assert_close(head.ridge(x, sy, 3), direct, rtol=1e-10, atol=1e-12)
    params = head.adapt(sx, sy)
    fq = model.forward_features(qx)
    torch.testing.assert_close(call_model(model, qx, params), 2.0 * fq @ direct + 0.3, rtol=1e-10, atol=1e-12)


def test_r2d2_meta_gradients_match_a_second_implementation():
    model = model64(d=6)
    sx, sy, qx, qy = task(shots=1)
    head = R2D2Head(model, lam=0.5, scale=1.5, bias=0.1).double()
    loss = F.cross_entropy(call_model(model, qx, head.adapt(sx, sy)), qy)
    wrt = [*[p for n, p in model.named_parameters() if n.startswith("body")], head.log_lam, head.scale, head.bias]
    got = torch.autograd.grad(loss, wrt)
    # second implementation: the primal inverse, written out
    x, fq = model.forward_features(sx), model.forward_features(qx)
    lam = head.log_lam.exp()
    w = torch.inverse(x.t() @ x + lam * torch.eye(6, dtype=torch.float64)) @ x.t() @ F.one_hot(sy, 3).double()
    ref = F.cross_entropy(head.scale * fq @ w + head.bias, qy)
    want = torch.autograd.grad(ref, wrt)
    for g, w_ in zip(got, want):
        torch.testing.assert_close(g, w_, rtol=1e-8, atol=1e-10)
    assert sorted(n for n, _ in head.named_parameters()) == ["bias", "log_lam", "scale"]  # not the model's


def test_r2d2_refuses_a_non_positive_regulariser():
    with pytest.raises(ValueError, match="lam"):
        R2D2Head(model64(), lam=0.0)


def test_metric_heads_work_with_robust_meta_models_and_evaluate():
    torch.manual_seed(0)
    model = rm.Conv4(1, 3, hidden=4, image_size=8)
    g = torch.Generator().manual_seed(0)
    tasks = [rm.Task(torch.rand(3, 1, 8, 8, generator=g), torch.arange(3), torch.rand(6, 1, 8, 8, generator=g),
                     torch.arange(3).repeat(2)) for _ in range(2)]
    for head in (ProtoNetHead(model), R2D2Head(model)):
        params = head.adapt(tasks[0].support_x, tasks[0].support_y)
        assert call_model(model, tasks[0].query_x, params).shape == (6, 3)


# ----------------------------------------------------------------------------- everywhere a learner is chosen
def _tiny(**kw):
    from robust_meta.demo import demo_config

    return demo_config("rmaml-out", quick=True).replace(meta_steps=4, eval_every=2, **kw)


@pytest.mark.parametrize("learner", ["protonet", "r2d2"])
def test_train_resume_checkpoint_and_eval_with_a_metric_learner(learner, tmp_path, capsys):
    from robust_meta.cli import main
    from robust_meta.metric import learner_from_checkpoint
    from robust_meta.train import load_checkpoint, model_from_checkpoint, train

    cfg = _tiny(learner=learner)
    best = train(cfg, out_dir=tmp_path / "full", progress=False)
    train(cfg.replace(meta_steps=2), out_dir=tmp_path / "part", progress=False)
    train(cfg, out_dir=tmp_path / "part", resume=True, progress=False)
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "part" / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k  # bitwise resume
    assert a["extra"]["learner"] == b["extra"]["learner"]
    model, config, ckpt = model_from_checkpoint(best)
    assert config.learner == learner
    head = learner_from_checkpoint(model, config, ckpt)
    assert type(head).__name__ == {"protonet": "ProtoNetHead", "r2d2": "R2D2Head"}[learner]
    if learner == "r2d2":  # its meta-learned λ, scale and bias were trained and stored
        assert set(ckpt["extra"]["learner"]) == {"log_lam", "scale", "bias"}
        assert float(head.scale.detach()) == float(ckpt["extra"]["learner"]["scale"])
    out = tmp_path / "e.json"
    assert main(["eval", str(best), "--tasks", "3", "--attack-steps", "2", "--no-progress", "--out", str(out)]) == 0
    import json

    res = json.loads(out.read_text())
    assert res["settings"]["train_mode"] is False and res["settings"]["learner"] == learner


def test_a_metric_learner_refuses_inner_steps_options():
    from robust_meta.train import TrainConfig

    with pytest.raises(ValueError, match="closed form"):
        TrainConfig(method="anil", learner="protonet").resolved()
    with pytest.raises(ValueError, match="unknown learner"):
        TrainConfig(learner="svm").resolved()
    model = model64()
    sx, sy, qx, qy = task()
    t = [rm.Task(sx, sy, qx, qy)]
    with pytest.raises(ValueError, match="no fine-tuning steps"):
        rm.evaluate(model, t, eps=0.1, learner="protonet", finetune="adversarial", progress=False)
    res = rm.evaluate(model, t, eps=[0, 0.1], learner="protonet", train_mode=False, progress=False, seed=0)
    manual = (call_model(model, qx, ProtoNetHead(model).adapt(sx, sy)).argmax(1) == qy).double().mean()
    assert res.metrics["sa"].values == [float(manual)]


# ----------------------------------------------------------------------------- support-set attacks
class Identity(nn.Module):
    """f(x) = x flattened; a linear classifier on top (for a known optimum)."""

    def __init__(self, d=4, ways=2):
        super().__init__()
        self.classifier = nn.Linear(d, ways)

    def forward_features(self, x):
        return x.flatten(1)

    def forward(self, x):
        return self.classifier(self.forward_features(x))


def test_support_attack_on_protonet_reaches_the_known_optimum():
    """1-shot 2-way ProtoNet on f(x) = x, one query of class 0: the loss grows as c_0 moves away
    from q and c_1 towards it, so the optimum is s_0 + ε·sign(s_0 - q), s_1 + ε·sign(q - s_1)."""
    from robust_meta.support_attacks import perturb_support

    model = Identity().double()
    s = torch.tensor([[0.2, 0.5, 0.7, 0.4], [0.8, 0.1, 0.3, 0.9]], dtype=torch.float64)
    q = torch.tensor([[0.4, 0.4, 0.5, 0.6]], dtype=torch.float64)
    sy, qy = torch.tensor([0, 1]), torch.tensor([0])
    eps = 0.05  # below every |q - s_1| coordinate: no overshoot
    head = ProtoNetHead(model)
    adv = perturb_support(head.adapt, model, s.view(2, 1, 2, 2), sy, q.view(1, 1, 2, 2), qy, eps=eps,
                          steps=20, step_size=eps / 4)
    want = torch.stack([s[0] + eps * torch.sign(s[0] - q[0]), s[1] + eps * torch.sign(q[0] - s[1])])
    torch.testing.assert_close(adv.view(2, 4), want, atol=1e-12, rtol=0)

    def loss(x):
        return float(F.cross_entropy(call_model(model, q.view(1, 1, 2, 2), head.adapt(x, sy)), qy))

    assert loss(adv) > loss(s.view(2, 1, 2, 2))


@pytest.mark.parametrize("learner", ["protonet", "maml"])
def test_evaluate_reports_support_and_both_threats_and_leaves_buffers_alone(learner):
    torch.manual_seed(0)
    model = rm.Conv4(1, 3, hidden=4, image_size=8)
    g = torch.Generator().manual_seed(0)
    tasks = [rm.Task(torch.rand(3, 1, 8, 8, generator=g), torch.arange(3), torch.rand(9, 1, 8, 8, generator=g),
                     torch.arange(3).repeat(3)) for _ in range(3)]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    res = rm.evaluate(model, tasks, eps=[0, 16 / 255], steps=2, step_size=0.1, attack_steps=3, seed=0,
                      learner=None if learner == "maml" else learner, train_mode=learner == "maml",
                      threats=("query", "support", "both"), progress=False)
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    m = res.metrics
    assert {"ra_support[pgd@16/255]", "ra_both[pgd@16/255]"} <= set(m)
    assert m["ra_both[pgd@16/255]"].mean <= m["sa"].mean + 1e-9
    assert res.settings["threats"] == ["query", "support", "both"]
    with pytest.raises(ValueError, match="unknown threats"):
        rm.evaluate(model, tasks, eps=0.1, threats=("labels",), progress=False)
