"""Use raflora from a plain PyTorch training loop (no PEFT).

A tiny regression model with a hand-written LoRA layer joins a federation, and for each round
pulls the global adapter at its own rank, trains, and pushes. Run a server first
(``raflora-server``), then:

    python examples/plain_pytorch.py --target 127.0.0.1:50051 --rank 4
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from torch import nn

from raflora.client_sdk import AdminClient, AlreadyExistsError, RafloraClient, pb


class LoraLinear(nn.Module):
    """y = W x + (alpha / r) · B A x, with W frozen: the layout PEFT uses."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
        self.lora_A = nn.Parameter(torch.zeros(rank, d_in))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x) + self.scale * (x @ self.lora_A.T) @ self.lora_B.T
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--federation", default="plain-example")
    p.add_argument("--client-id", default="plain-client")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=float, default=8.0)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    torch.manual_seed(0)  # every client shares the frozen base weights
    layer = LoraLinear(16, 8, args.rank, args.alpha)
    target_w = torch.randn(8, 16)  # this client's private task
    module = "layer"  # the name under which the federation knows this adapted weight

    with AdminClient(args.target) as admin, contextlib.suppress(AlreadyExistsError):
        admin.create_federation(
            pb.FederationSpec(
                federation_id=args.federation,
                max_rank=8,
                lora_alpha=args.alpha,
                modules=[pb.ModuleSpec(name=module, d_out=8, d_in=16)],
            )
        )

    with RafloraClient(args.target, args.federation, args.client_id) as client:
        info = client.join(rank=args.rank, num_examples=256, lora_alpha=args.alpha)
        assert abs(info.scale - layer.scale) < 1e-9, "the server must use the same alpha/r"
        for _ in range(args.rounds):
            pulled = client.pull()
            with torch.no_grad():
                layer.lora_A.copy_(pulled.tensors[f"{module}.lora_A.weight"])
                layer.lora_B.copy_(pulled.tensors[f"{module}.lora_B.weight"])
            opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=1e-2)
            for _ in range(50):
                x = torch.randn(32, 16)
                loss = (layer(x) - x @ target_w.T).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            client.push(
                {f"{module}.lora_A.weight": layer.lora_A, f"{module}.lora_B.weight": layer.lora_B},
                round=pulled.round,
                num_examples=256,
            )
            status = client.wait_for_round(pulled.round, timeout=600)
            print(
                f"round {pulled.round}: local loss {float(loss):.4f}; "
                f"round {status.round} published (E_min {status.energy.e_min:.3f})"
            )


if __name__ == "__main__":
    main()
