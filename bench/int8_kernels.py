"""Int8 Linear kernels against fp32 on the CPU, one JSON line.

Each candidate runs the MiniLM shapes (batch 32 x length 64 = 2048 rows; 384->1536, 1536->384, 384->384) on
`--threads` threads. The machine is shared and noisy, so candidates alternate within every round and each
round keeps the fastest of a few calls; the line reports the median over rounds and the spread (min-max).
ONNX Runtime's dynamic int8 MatMul runs too when it is installed. With `--model` it also times the whole
all-MiniLM-L6-v2 classifier (fp32 against `quantize_int8`).

    .venv/bin/python bench/int8_kernels.py --rounds 7 --model
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

ROWS = 2048
SHAPES = [(384, 1536), (1536, 384), (384, 384)]


def _packed_dynamic(engine: str, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor):
    """quantized::linear_dynamic of `engine` (fbgemm or onednn): per-tensor dynamic activations inside."""
    torch.backends.quantized.engine = engine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zero = torch.zeros(weight.shape[0], dtype=torch.long)
        quantized = torch.quantize_per_channel(
            weight.float() * scale[:, None], scale.double(), zero, 0, torch.qint8
        )
        packed = torch.ops.quantized.linear_prepack(quantized, bias)
    return lambda x: torch.ops.quantized.linear_dynamic(x, packed, False)


def candidates(in_features: int, out_features: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The kernels under test for one shape, each a function of x fp32 [ROWS, in] -> fp32 [ROWS, out]."""
    from llmkernel.models.int8 import Int8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features)
    weight, bias = linear.weight.detach(), linear.bias.detach()
    scale = weight.abs().amax(1) / 127
    weight_int8 = torch.round(weight / scale[:, None]).to(torch.int8)
    weight_t = weight_int8.t()
    zeros = torch.zeros(out_features, dtype=torch.long)
    packed_onednn = torch.ops.onednn.qlinear_prepack(weight_int8, [ROWS, in_features])
    static_scale = 4.0 / 127

    def int_mm_per_token(x: torch.Tensor) -> torch.Tensor:
        token_scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127
        x_int8 = torch.round(x / token_scale).to(torch.int8)
        return torch._int_mm(x_int8, weight_t) * (token_scale * scale) + bias

    def onednn_pointwise(x_uint8: torch.Tensor, x_scale: float, zero_point: int) -> torch.Tensor:
        return torch.ops.onednn.qlinear_pointwise(
            x_uint8,
            x_scale,
            zero_point,
            packed_onednn,
            scale,
            zeros,
            bias,
            1.0,
            0,
            torch.float32,
            "none",
            [],
            "",
        )

    def onednn_static(x: torch.Tensor) -> torch.Tensor:
        x_uint8 = torch.clamp(torch.round(x / static_scale) + 128, 0, 255).to(torch.uint8)
        return onednn_pointwise(x_uint8, static_scale, 128)

    def onednn_pointwise_dynamic(x: torch.Tensor) -> torch.Tensor:
        low, high = torch.aminmax(x)
        x_scale = float((high - low).clamp_min(1e-8)) / 255
        zero_point = int(torch.round(-low / x_scale).clamp(0, 255))
        x_uint8 = torch.clamp(torch.round(x / x_scale) + zero_point, 0, 255).to(torch.uint8)
        return onednn_pointwise(x_uint8, x_scale, zero_point)

    module_dynamic = Int8Linear.from_linear(linear)
    module_static = Int8Linear.from_linear(linear, input_scale=torch.tensor(static_scale))
    return {
        "fp32": lambda x: F.linear(x, weight, bias),
        "fbgemm_dynamic": _packed_dynamic("fbgemm", weight_int8, scale, bias),
        "onednn_dynamic": _packed_dynamic("onednn", weight_int8, scale, bias),
        "int_mm_per_token": int_mm_per_token,
        "onednn_pointwise_static": onednn_static,
        "onednn_pointwise_dynamic": onednn_pointwise_dynamic,
        "Int8Linear_dynamic": module_dynamic,
        "Int8Linear_static": module_static,
        **_onnxruntime_candidate(linear),
    }


def _onnxruntime_candidate(linear: torch.nn.Linear) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """ONNX Runtime's dynamic int8 MatMul (quantize_dynamic, per-channel QInt8) of the same Linear, if installed."""
    try:
        import onnx
        import onnxruntime
        from onnx import TensorProto, helper, numpy_helper
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        return {}
    import os
    import tempfile

    weight = linear.weight.detach().t().contiguous().numpy()
    bias = linear.bias.detach().numpy()
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, weight.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, weight.shape[1]])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    folder = tempfile.mkdtemp()
    fp32_path, int8_path = os.path.join(folder, "fp32.onnx"), os.path.join(folder, "int8.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), fp32_path)
    quantize_dynamic(fp32_path, int8_path, weight_type=QuantType.QInt8, per_channel=True)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(int8_path, options, providers=["CPUExecutionProvider"])
    return {"onnxruntime_dynamic": lambda x: session.run(None, {"x": x.numpy()})[0]}


def time_alternating(functions: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, dict]:
    """Median and min-max (ms) over rounds of the fastest of `calls` calls, candidates alternating in each round."""
    for function in functions.values():  # warm-up: lazy packing, allocator, thread pools
        function()
        function()
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            best = float("inf")
            for _ in range(calls):
                start = time.perf_counter()
                function()
                best = min(best, time.perf_counter() - start)
            samples[name].append(best * 1e3)
    return {
        name: {
            "median_ms": round(statistics.median(t), 3),
            "min_ms": round(min(t), 3),
            "max_ms": round(max(t), 3),
        }
        for name, t in samples.items()
    }


def whole_model(rounds: int) -> dict:
    """fp32 against quantize_int8 (dynamic) on the real all-MiniLM-L6-v2 classifier at 32 x 64."""
    from transformers import AutoModelForSequenceClassification

    from llmkernel.models.int8 import quantize_int8
    from llmkernel.models.loading import minilm_folder

    fp32 = AutoModelForSequenceClassification.from_pretrained(minilm_folder(), num_labels=2).eval()
    int8 = AutoModelForSequenceClassification.from_pretrained(minilm_folder(), num_labels=2).eval()
    quantize_int8(int8)
    torch.manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 20000, (32, 64)),
        "attention_mask": torch.ones(32, 64, dtype=torch.long),
    }
    with torch.inference_mode():
        times = time_alternating(
            {"fp32": lambda: fp32(**batch), "int8": lambda: int8(**batch)}, rounds=rounds, calls=2
        )
    times["speedup_median"] = round(times["fp32"]["median_ms"] / times["int8"]["median_ms"], 2)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--model", action="store_true", help="also time the whole MiniLM classifier")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result: dict = {"bench": "int8_kernels", "threads": args.threads, "rows": ROWS, "shapes": {}}
    with torch.inference_mode():
        for in_features, out_features in SHAPES:
            functions = candidates(in_features, out_features)
            x = torch.randn(ROWS, in_features)
            times = time_alternating(
                {name: (lambda f=f, x=x: f(x)) for name, f in functions.items()}, args.rounds, args.calls
            )
            fp32 = times["fp32"]["median_ms"]
            for entry in times.values():
                entry["speedup"] = round(fp32 / entry["median_ms"], 2)
            result["shapes"][f"{in_features}->{out_features}"] = times
    if args.model:
        result["model"] = whole_model(args.rounds)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
