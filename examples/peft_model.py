"""Use raflora with a PEFT model: the helpers check names, rank and scaling for you.

python examples/peft_model.py --target 127.0.0.1:50051 --rank 8
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from raflora.client_sdk import AdminClient, AlreadyExistsError, RafloraClient, pb
from raflora.client_sdk.peft_adapter import adapter_shapes, adapter_state, load_pulled_adapter


class TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(32, 32)
        self.value = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.tanh(self.query(x)) * self.value(x))
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--federation", default="peft-example")
    p.add_argument("--client-id", default="peft-client")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    torch.manual_seed(0)  # the frozen base model is the same everywhere
    alpha = 2 * args.rank
    model = get_peft_model(
        TinyEncoder(), LoraConfig(r=args.rank, lora_alpha=alpha, target_modules=["query", "value"])
    )
    shapes = adapter_shapes(model)  # {"base_model.model.query": (32, 32), ...}

    with AdminClient(args.target) as admin, contextlib.suppress(AlreadyExistsError):
        admin.create_federation(
            pb.FederationSpec(
                federation_id=args.federation,
                max_rank=16,
                modules=[pb.ModuleSpec(name=n, d_out=o, d_in=i) for n, (o, i) in shapes.items()],
            )
        )

    g = torch.Generator().manual_seed(hash(args.client_id) % 2**31)
    x, y = torch.randn(256, 32, generator=g), torch.randint(0, 4, (256,), generator=g)
    with RafloraClient(args.target, args.federation, args.client_id) as client:
        client.join(rank=args.rank, num_examples=len(y), lora_alpha=alpha)
        for _ in range(args.rounds):
            pulled = client.pull()
            load_pulled_adapter(model, pulled)  # raises if rank, scaling or names differ
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
            for _ in range(30):
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
            client.push(adapter_state(model), round=pulled.round, num_examples=len(y))
            status = client.wait_for_round(pulled.round, timeout=600)
            print(f"round {pulled.round}: loss {float(loss):.4f}; round {status.round} published")


if __name__ == "__main__":
    main()
