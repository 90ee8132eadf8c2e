"""The SDK's factor helpers: (B, A) in the order of ΔW = s·B·A, and back from PEFT names."""

from __future__ import annotations

import pytest
import torch

from raflora.client_sdk import lora_state_dict, module_factors


def test_state_dict_and_module_factors_are_inverse() -> None:
    B, A = torch.randn(6, 2), torch.randn(2, 5)
    tensors = lora_state_dict({"layer.q": (B, A)})
    assert set(tensors) == {"layer.q.lora_A.weight", "layer.q.lora_B.weight"}
    assert tensors["layer.q.lora_B.weight"] is B and tensors["layer.q.lora_A.weight"] is A
    (B2, A2) = module_factors(tensors)["layer.q"]
    assert torch.equal(B2 @ A2, B @ A)


def test_the_old_a_b_order_is_refused_with_the_shapes() -> None:
    B, A = torch.randn(6, 2), torch.randn(2, 5)
    with pytest.raises(ValueError, match=r"layer\.q: expected \(B, A\).*\(2, 5\) and \(6, 2\)"):
        lora_state_dict({"layer.q": (A, B)})


def test_module_factors_leaves_out_merge_tensors_and_names_incomplete_modules() -> None:
    tensors = lora_state_dict({"m": (torch.randn(3, 1), torch.randn(1, 4))})
    tensors["m.merge.lora_A.weight"] = torch.randn(1, 4)
    tensors["m.merge.lora_B.weight"] = torch.randn(3, 1)
    assert set(module_factors(tensors)) == {"m"}
    del tensors["m.lora_B.weight"]
    with pytest.raises(ValueError, match=r"\['m'\]"):
        module_factors(tensors)


def test_the_old_order_is_refused_on_square_modules_too() -> None:
    B, A = torch.randn(8, 2), torch.randn(2, 8)  # a square 8 × 8 module at rank 2
    with pytest.raises(ValueError, match=r"expected \(B, A\)"):
        lora_state_dict({"q": (A, B)})
    assert set(lora_state_dict({"q": (B, A)})) == {"q.lora_A.weight", "q.lora_B.weight"}


@pytest.mark.parametrize("total_mib", [1, 12])  # below and above the mapped-buffer threshold
def test_a_download_is_its_bytes_as_writable_tensors_that_outlive_the_stream(
    total_mib: int,
) -> None:
    """receive_adapter against safetensors' own reading of the same bytes, at both buffer
    kinds; the tensors stay valid and writable after everything else is gone."""
    import gc
    import hashlib

    from safetensors.torch import load, save

    from raflora.client_sdk import pb
    from raflora.client_sdk.payload import receive_adapter

    g = torch.Generator().manual_seed(total_mib)
    rows = total_mib * 2048  # two fp32 tensors of rows x 64
    tensors = {f"t{i}": torch.randn(rows, 64, generator=g) for i in range(2)}
    payload = save(tensors)
    header = pb.PullHeader(total_bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest())
    chunks = [memoryview(payload)[i : i + 65536] for i in range(0, len(payload), 65536)]
    _, got = receive_adapter([pb.PullChunk(header=header), *chunks])
    expected = load(payload)
    del payload, chunks
    gc.collect()
    assert got.keys() == expected.keys()
    for name, tensor in got.items():
        assert torch.equal(tensor, expected[name])
        tensor.mul_(2)  # writable, and its own memory
        assert torch.equal(tensor, expected[name] * 2)
