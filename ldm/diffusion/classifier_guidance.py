"""Classifier guidance: a noise-aware classifier's gradient shifts the model's noise prediction.

Dhariwal & Nichol 2021, Algorithm 2 (DDIM-type samplers), in our notation:

    eps'(x_t) = eps(x_t) - s sigma_t grad_x log p(y | x_t)

i.e. the score of p(x_t) p(y | x_t)^s. It wraps the model function (eps, v or x0 output) like
``ClassifierFreeGuidance`` does, so every sampler that goes through ``Denoiser`` is guided, and it
composes with classifier-free guidance: ``ClassifierGuidance(ClassifierFreeGuidance(...), ...)``.
Each step costs one classifier forward and backward on top of the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from ldm.diffusion.denoiser import ModelFn
from ldm.diffusion.parameterization import PredictionType, check_prediction_type, predict_eps, training_target
from ldm.diffusion.schedules import NoiseSchedule

# log p(y | x_t) per image, (B,), of noisy inputs (B, C, H, W) at timesteps (B,); differentiable in x_t
LogLikelihood = Callable[[Tensor, Tensor], Tensor]


class ClassLogLikelihood:
    """log p(y | x_t) from a classifier returning {attribute: logits (B, classes)} (``NoisyClassifier``)
    and the wanted labels {attribute: class indices (B,)}, an index < 0 leaving that attribute free.

    The attributes' log-probabilities add: p(y | x_t) = prod_a p(y_a | x_t), the classifier's heads
    being trained independently.
    """

    def __init__(self, classifier: nn.Module, labels: Mapping[str, Tensor]):
        unknown = sorted(set(labels) - set(getattr(classifier, "heads_classes", labels)))
        if unknown:
            raise ValueError(f"the classifier has no head(s) {', '.join(unknown)}")
        self.classifier = classifier
        self.labels = dict(labels)

    def __call__(self, x: Tensor, timesteps: Tensor) -> Tensor:
        logits = self.classifier(x, timesteps)
        total = x.new_zeros(x.shape[0], dtype=torch.float32)
        for name, label in self.labels.items():
            label = label.to(x.device)
            log_probs = torch.log_softmax(logits[name].float(), dim=-1)  # (B, classes)
            total = total + log_probs.gather(1, label.clamp(min=0)[:, None]).squeeze(1) * (label >= 0)
        return total


def log_likelihood_gradient(log_likelihood: LogLikelihood, x: Tensor, t: int) -> Tensor:
    """grad_x log p(y | x_t) at one shared timestep t, (B, C, H, W) in x's dtype.

    Gradients are switched on here, so it works inside samplers' ``torch.no_grad`` (not inside
    ``torch.inference_mode``, whose tensors cannot enter autograd).
    """
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        timesteps = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        # each image's log-likelihood depends on its own x only, so the gradient of the sum is per image
        (gradient,) = torch.autograd.grad(log_likelihood(x_in, timesteps).sum(), x_in)
    return gradient.to(x.dtype)


class ClassifierGuidance:
    """f'(x_t, t): the model function's output with eps shifted by -s sigma_t grad log p(y | x_t)
    (Dhariwal & Nichol 2021, Algorithm 2), returned in the model's own prediction type:

        eps' = eps - k g,   x0' = x0 + (sigma_t / alpha_t) k g,   v' = v - k g / alpha_t,   k = s sigma_t

    (x0' and v' follow from x_t = alpha x0 + sigma eps and v = alpha eps - sigma x0 with x_t held).
    Where alpha_t = 0 (the first step at zero terminal SNR) x_t holds no information about y and the
    shift would be infinite in x0 and v: the output is left as it is there. ``scale`` 0 is the model.
    """

    def __init__(
        self,
        model_fn: ModelFn,
        log_likelihood: LogLikelihood,
        scale: float,
        schedule: NoiseSchedule,
        prediction_type: PredictionType,
    ):
        self.model_fn = model_fn
        self.log_likelihood = log_likelihood
        self.scale = scale
        self.schedule = schedule
        self.prediction_type = check_prediction_type(prediction_type)

    def __call__(self, x: Tensor, t: int) -> Tensor:
        output = self.model_fn(x, t)
        alpha, sigma = self.schedule.alpha(t).item(), self.schedule.sigma(t).item()
        if self.scale == 0 or alpha == 0:
            return output
        gradient = log_likelihood_gradient(self.log_likelihood, x, t).to(output.dtype)  # (B, C, H, W)
        eps = predict_eps(self.prediction_type, output, x.to(output.dtype), alpha, sigma)
        eps = eps - self.scale * sigma * gradient
        x0 = (x.to(output.dtype) - sigma * eps) / alpha
        return training_target(self.prediction_type, x0, eps, alpha, sigma)
