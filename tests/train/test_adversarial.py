"""Adversarial training on the input embeddings: FGM, PGD and FreeLB as the loop's backward step."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from llmkernel.io.tables import ClassificationData
from llmkernel.tasks.classify import Classify
from llmkernel.train.adversarial import Adversary, EmbeddingPerturbation, _normalised, _project
from llmkernel.train.loop import plain_backward
from llmkernel.train.methods import apply_lora, freeze_all_but_top_layers

TEXTS = ["hello world", "alice lives in paris", "call me in berlin, bob!"]  # varied lengths: padding
LABELS = ["positive", "negative", "positive"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def setup(bert_folder):
    """(model in eval mode: no dropout, task, batch) for the tiny classifier."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(bert_folder).eval()
    task = Classify(AutoTokenizer.from_pretrained(bert_folder), ["negative", "positive"], 32, 4)
    data = ClassificationData(TEXTS, None, LABELS, "text", None, "label", "mem")
    return model, task, task.collate(task.encode(data))


def compute_loss_for(model, task, batch):
    return lambda: task.loss(model, batch)


def gradients(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def plain_gradients(model, task, batch, scale) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    plain_backward(compute_loss_for(model, task, batch), scale, batch)
    grads = gradients(model)
    model.zero_grad(set_to_none=True)
    return grads


def logits(model, task, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**task.model_inputs(batch)).logits


def recorded_deltas(adversary: Adversary) -> list[torch.Tensor]:
    """Every perturbation the adversary activates, recorded (detached) as it is used."""
    seen: list[torch.Tensor] = []
    original = adversary.perturbation.active

    @contextlib.contextmanager
    def recording(delta):
        seen.append(delta.detach().clone())
        with original(delta) as active:
            yield active

    adversary.perturbation.active = recording
    return seen


def per_example_norms(delta: torch.Tensor) -> torch.Tensor:
    return delta.flatten(1).norm(dim=1)


# ----------------------------------------------------------------------------------- helpers


def embedding_norms(model, batch) -> torch.Tensor:
    """(batch,) each sequence's input-embedding norm over its real tokens: what epsilon is relative to."""
    with torch.no_grad():
        embeds = model.get_input_embeddings()(batch["input_ids"]) * batch["attention_mask"].unsqueeze(-1)
    return embeds.flatten(1).norm(dim=1)


def test_normalised_gives_unit_norm_per_example():
    scales = torch.tensor([1e-3, 1.0, 50.0]).view(-1, 1, 1)
    gradient = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0)) * scales
    torch.testing.assert_close(per_example_norms(_normalised(gradient)), torch.ones(3))
    assert torch.equal(_normalised(torch.zeros(2, 3, 4)), torch.zeros(2, 3, 4))  # no NaN for a zero gradient


def test_project_scales_only_examples_outside_the_epsilon_ball():
    delta = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(1))
    delta = (
        delta / per_example_norms(delta).view(-1, 1, 1) * torch.tensor([0.5, 0.99, 2.0, 10.0]).view(-1, 1, 1)
    )
    projected = _project(delta, epsilon=1.0)
    torch.testing.assert_close(per_example_norms(projected), torch.tensor([0.5, 0.99, 1.0, 1.0]))
    torch.testing.assert_close(projected[:2], delta[:2])  # inside: unchanged
    torch.testing.assert_close(projected[2], delta[2] / 2)  # outside: same direction, radius epsilon
    assert _project(delta, epsilon=0.0) is delta  # 0: no bound


def test_perturbation_is_a_no_op_unless_active_and_inactive_after_an_error(setup):
    model, task, batch = setup
    perturbation = EmbeddingPerturbation(model)
    clean = logits(model, task, batch)
    delta = torch.randn(*batch["input_ids"].shape, 32, generator=torch.Generator().manual_seed(0))
    with perturbation.active(delta):
        assert not torch.allclose(logits(model, task, batch), clean)
    torch.testing.assert_close(logits(model, task, batch), clean, atol=0, rtol=0)
    with pytest.raises(RuntimeError), perturbation.active(delta):
        raise RuntimeError("a failing forward pass")
    assert perturbation.delta is None


# ----------------------------------------------------------------------------------- methods


@pytest.mark.parametrize("method", ["fgm", "pgd"])
def test_fgm_and_pgd_return_the_clean_loss(setup, method):
    model, task, batch = setup
    compute_loss = compute_loss_for(model, task, batch)
    with torch.no_grad():
        clean = compute_loss()
    adversary = Adversary(model, method, epsilon=1.0, step_size=0.5, steps=3)
    loss = adversary(compute_loss, 1 / task.count(batch), batch)
    assert loss.item() == pytest.approx(clean.item(), rel=1e-6)


@pytest.mark.parametrize("method", ["fgm", "pgd", "freelb"])
def test_adversarial_gradients_differ_from_plain_and_leave_no_perturbation(setup, method):
    model, task, batch = setup
    scale = 1 / task.count(batch)
    plain = plain_gradients(model, task, batch, scale)
    before = logits(model, task, batch)
    adversary = Adversary(model, method, epsilon=1.0, step_size=0.5, steps=3)
    adversary(compute_loss_for(model, task, batch), scale, batch)
    adversarial = gradients(model)
    assert adversarial.keys() == plain.keys()
    assert not all(torch.allclose(adversarial[n], plain[n]) for n in plain)
    assert adversary.perturbation.delta is None
    torch.testing.assert_close(logits(model, task, batch), before, atol=0, rtol=0)


def test_fgm_gradient_is_clean_plus_the_gradient_at_epsilon_along_the_embedding_gradient(setup):
    model, task, batch = setup
    scale, epsilon = 1 / task.count(batch), 0.7
    inputs = task.model_inputs(batch)
    embeddings = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_(True)
    others = {k: v for k, v in inputs.items() if k != "input_ids"}

    def loss_at(perturbed: torch.Tensor) -> torch.Tensor:
        logits = model(inputs_embeds=perturbed, **others).logits
        return F.cross_entropy(logits, batch["labels"], reduction="sum") * scale

    (direction,) = torch.autograd.grad(loss_at(embeddings), embeddings)
    direction = direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1)
    model.zero_grad(set_to_none=True)
    loss_at(embeddings.detach()).backward()
    radius = epsilon * embedding_norms(model, batch).view(-1, 1, 1)  # epsilon is relative
    loss_at(embeddings.detach() + radius * direction).backward()
    expected = gradients(model)

    model.zero_grad(set_to_none=True)
    Adversary(model, "fgm", epsilon=epsilon, step_size=0.0, steps=1)(
        compute_loss_for(model, task, batch), scale, batch
    )
    actual = gradients(model)
    # word embeddings: inputs_embeds bypasses their lookup, so compare every other parameter
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, atol=1e-6, rtol=1e-4)


def test_pgd_with_one_step_of_epsilon_equals_fgm(setup):
    model, task, batch = setup
    scale = 1 / task.count(batch)
    fgm = Adversary(model, "fgm", epsilon=0.3, step_size=0.0, steps=1)
    fgm(compute_loss_for(model, task, batch), scale, batch)
    fgm_gradients = gradients(model)
    model.zero_grad(set_to_none=True)
    pgd = Adversary(model, "pgd", epsilon=0.3, step_size=0.3, steps=1)  # fgm's hook stays, inert
    pgd(compute_loss_for(model, task, batch), scale, batch)
    for name, grad in gradients(model).items():
        torch.testing.assert_close(grad, fgm_gradients[name], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("method", ["pgd", "freelb"])
def test_perturbations_stay_within_epsilon(setup, method):
    model, task, batch = setup
    epsilon = 0.4
    adversary = Adversary(model, method, epsilon=epsilon, step_size=0.3, steps=4)  # 4 x 0.3 > epsilon
    deltas = recorded_deltas(adversary)
    adversary(compute_loss_for(model, task, batch), 1 / task.count(batch), batch)
    assert len(deltas) == {"pgd": 1 + 3 + 1, "freelb": 4}[method]
    norms = torch.stack([per_example_norms(d) for d in deltas]) / embedding_norms(model, batch)
    assert norms.max() <= epsilon * (1 + 1e-5)  # relative to each sequence's embedding norm
    assert norms[-1].min() == pytest.approx(epsilon, rel=1e-4)  # the last steps reach the boundary


def test_freelb_leaves_padding_unperturbed(setup):
    model, task, batch = setup
    adversary = Adversary(model, "freelb", epsilon=1.0, step_size=0.1, steps=3)
    deltas = recorded_deltas(adversary)
    adversary(compute_loss_for(model, task, batch), 1 / task.count(batch), batch)
    padding = batch["attention_mask"] == 0
    assert padding.any()
    assert all(torch.equal(d[padding], torch.zeros_like(d[padding])) for d in deltas)


def test_freelb_with_tiny_steps_averages_to_the_plain_gradient(setup):
    model, task, batch = setup
    scale = 1 / task.count(batch)
    plain = plain_gradients(model, task, batch, scale)
    torch.manual_seed(0)
    adversary = Adversary(model, "freelb", epsilon=1e-6, step_size=1e-6, steps=3)
    loss = adversary(compute_loss_for(model, task, batch), scale, batch)
    freelb = gradients(model)
    for name in plain:  # K nearly clean passes, each scaled by 1/K
        torch.testing.assert_close(freelb[name], plain[name], atol=1e-5, rtol=1e-3)
    with torch.no_grad():
        assert loss.item() == pytest.approx(task.loss(model, batch).item(), rel=1e-4)


@pytest.mark.parametrize("method", ["fgm", "pgd", "freelb"])
def test_adversary_works_with_frozen_embeddings(setup, method):
    model, task, batch = setup
    freeze_all_but_top_layers(model, 1)
    assert not model.get_input_embeddings().weight.requires_grad
    scale = 1 / task.count(batch)
    plain = plain_gradients(model, task, batch, scale)
    adversary = Adversary(model, method, epsilon=1.0, step_size=0.5, steps=2)
    deltas = recorded_deltas(adversary)
    adversary(compute_loss_for(model, task, batch), scale, batch)
    adversarial = gradients(model)
    assert adversarial.keys() == plain.keys()
    assert not all(torch.allclose(adversarial[n], plain[n]) for n in plain)
    assert any(d.abs().sum() > 0 for d in deltas)  # the hook got a gradient: the attack is not zero


def test_adversary_on_a_lora_model_reaches_the_adapters(setup):
    model, task, batch = setup
    torch.manual_seed(0)
    peft_model = apply_lora(model, Classify, rank=2, alpha=4, dropout=0.0, target_modules=[]).eval()
    adversary = Adversary(peft_model, "fgm", epsilon=1.0, step_size=0.0, steps=1)
    deltas = recorded_deltas(adversary)
    adversary(compute_loss_for(peft_model, task, batch), 1 / task.count(batch), batch)
    grads = gradients(peft_model)
    assert any(".lora_B." in n for n in grads)
    expected = embedding_norms(peft_model, batch).tolist()  # epsilon 1.0: as long as the embeddings
    assert per_example_norms(deltas[-1]).tolist() == pytest.approx(expected, rel=1e-5)
