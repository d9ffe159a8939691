"""The tiny reference model and a seeded perturbation of it: a policy whose values are not all zero."""

import copy

import torch

from shiq_lab.infra.models import load_model


def tiny_policy_and_reference(scale: float = 0.05, seed: int = 1):
    """``(policy, reference, tokenizer)``: the policy is the reference plus ``scale`` * N(0, 1) noise."""
    torch.manual_seed(0)
    reference, tokenizer = load_model("tiny")
    policy = copy.deepcopy(reference)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return policy, reference, tokenizer
