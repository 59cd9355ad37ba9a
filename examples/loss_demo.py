"""A loss-level SamPO demo (runs in seconds on CPU, no megatron-core needed).

A tiny bigram language model is trained on generated preference pairs whose chosen responses are
longer in most pairs, once with DPO and once with SamPO, from the same start. It prints per-step
metrics and, at the end, how the mean log-probability per token of long and short responses moved:
DPO rewards length, so it raises long responses' likelihood more than SamPO does.
"""

from __future__ import annotations

import torch

from sampo_megatron.losses import LossConfig, PreferenceInputs, preference_loss
from sampo_megatron.ops import vocab_parallel_logprobs

VOCAB, PROMPT, MAX_RESPONSE, PAIRS, STEPS = 64, 8, 40, 64, 30


def make_pairs(gen: torch.Generator):
    """Rows: chosen then rejected; chosen is longer in ~75% of pairs, content is random."""
    seq = PROMPT + MAX_RESPONSE + 1
    tokens = torch.randint(1, VOCAB, (2 * PAIRS, seq), generator=gen)
    long_len = torch.randint(25, MAX_RESPONSE + 1, (PAIRS,), generator=gen)
    short_len = torch.randint(5, 15, (PAIRS,), generator=gen)
    chosen_longer = torch.rand(PAIRS, generator=gen) < 0.75
    lengths = torch.cat([torch.where(chosen_longer, long_len, short_len), torch.where(chosen_longer, short_len, long_len)])
    position = torch.arange(seq - 1)[None, :] - (PROMPT - 1)  # target t+1 predicted at t
    mask = (position >= 0) & (position < lengths[:, None])
    return tokens, mask, lengths


class Bigram(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(VOCAB, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table(tokens)


def per_token_logps(model: Bigram, tokens: torch.Tensor) -> torch.Tensor:
    return vocab_parallel_logprobs(model(tokens[:, :-1]), tokens[:, 1:])


def train(debias: str, tokens, mask, lengths, start_state) -> Bigram:
    policy, reference = Bigram(), Bigram()
    policy.load_state_dict(start_state)
    reference.load_state_dict(start_state)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=5e-2)
    cfg = LossConfig(length_debias=debias, beta=0.1)
    with torch.no_grad():
        ref_logps = per_token_logps(reference, tokens)
    print(f"\n== {'SamPO' if debias == 'sampo' else 'DPO'} (--length-debias {debias}) ==")
    for step in range(1, STEPS + 1):
        out = preference_loss(PreferenceInputs(per_token_logps(policy, tokens), mask, torch.arange(PAIRS), ref_logps), cfg)
        optimizer.zero_grad()
        out.losses.mean().backward()
        optimizer.step()
        if step % 5 == 0 or step == 1:
            m = {k: v.mean().item() for k, v in out.metrics.items()}
            print(
                f"step {step:3d} | loss {m['loss']:.4f} | rewards/margins {m['rewards/margins']:+.4f} "
                f"| rewards/accuracies {m['rewards/accuracies']:.2f} | T_w {m['lengths/chosen']:.1f} "
                f"T_l {m['lengths/rejected']:.1f} T_m {m['lengths/kept']:.1f}"
            )
    return policy


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    tokens, mask, lengths = make_pairs(gen)
    torch.manual_seed(0)
    start_state = Bigram().state_dict()
    long_rows = lengths >= 25
    for debias in ("none", "sampo"):
        policy = train(debias, tokens, mask, lengths, start_state)
        with torch.no_grad():
            start = Bigram()
            start.load_state_dict(start_state)
            gain = (per_token_logps(policy, tokens) - per_token_logps(start, tokens)) * mask
            per_row = gain.sum(1) / mask.sum(1)
        print(
            f"mean log-prob gain per token: long responses {per_row[long_rows].mean():+.4f}, "
            f"short responses {per_row[~long_rows].mean():+.4f}"
        )


if __name__ == "__main__":
    main()
