"""The visual-token scorer exported as ``scorer.onnx`` (ARCHITECTURE.md, "Visual token reduction").

Inputs: ``image_features [N, D]`` (visual tokens in the LM embedding space),
``activity [N]`` (encoder-side saliency from ``vision.onnx``) and
``question_embeds [M, D]`` (the question's token embeddings). Outputs:

- ``relevance [N]``: softmax over visual tokens of ``Q V^T / sqrt(D)``, averaged over
  question tokens (sums to 1);
- ``score [N]``: the combined importance, relevance and activity each normalized to
  mean 1 and multiplied. The device's greedy low-rank selection consumes ``score``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

INPUTS = ["image_features", "activity", "question_embeds"]
OUTPUTS = ["relevance", "score"]
EPS = 1e-12


class TokenScorer(nn.Module):
    def forward(self, image_features: torch.Tensor, activity: torch.Tensor,
                question_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dim = image_features.shape[-1]
        logits = question_embeds @ image_features.transpose(0, 1) / math.sqrt(dim)  # [M, N]
        relevance = torch.softmax(logits, dim=-1).mean(dim=0)  # [N]
        score = (relevance / (relevance.mean() + EPS)) * (activity / (activity.mean() + EPS))
        return relevance, score
