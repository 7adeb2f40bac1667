"""Build the full-integer TFLite digits model from the shipped FP32 ONNX model.

    python scripts/build_tflite.py [--artifacts lepton/models/artifacts]

Needs the ``convert`` extra (``pip install -e '.[convert]'``: tensorflow-cpu, onnx,
onnxruntime, scikit-learn); nothing on a device does. Run it once after
``python scripts/build_artifacts.py``; it writes
``digits_fp32.tflite`` and ``digits_int8.tflite`` and ``digits_tflite.json`` (accuracies,
sizes) next to the ONNX files.

How: the CNN of ``lepton/models/digits.py`` is re-expressed in Keras (NHWC), the weights are copied
from ``digits_fp32.onnx`` (conv kernels OIHW -> HWIO; the classifier's rows re-ordered from
torch's CHW flattening to Keras' HWC), and the Keras model is checked against ONNX Runtime on
the test set before conversion. ``TFLiteConverter`` then makes an FP32 model and a
full-integer one: int8 weights and activations, int8 input and output, calibrated on the same
256 calibration digits as the ONNX INT8 model.

``--mobilenet DIR`` also writes ``mobilenet_fp32.tflite`` and ``mobilenet_int8.tflite`` (Keras'
MobileNetV2 at 224x224x3, randomly initialised, full-integer calibrated on random images) into
DIR, for ``bench/bench_int8.py --tflite-mobilenet DIR``; they are too large to ship.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lepton.models.data import digits_splits  # noqa: E402

MAX_LOGIT_DIFF = 1e-4


def onnx_weights(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def keras_digits(w: dict[str, np.ndarray]) -> Any:
    """The digits CNN in Keras with the ONNX model's weights."""
    import tensorflow as tf

    k = tf.keras.layers
    inp = k.Input(shape=(8, 8, 1), name="input")
    x = inp
    convs = []
    for name, filters in (("features.0", 8), ("features.2", 16), ("features.5", 32)):
        conv = k.Conv2D(filters, 3, padding="same", activation="relu", name=name)
        x = conv(x)
        convs.append((conv, name))
        if name != "features.0":
            x = k.MaxPooling2D(2)(x)
    dense = k.Dense(10, name="logits")
    out = dense(k.Flatten()(x))
    model = tf.keras.Model(inp, out)
    for conv, name in convs:
        kernel = np.transpose(w[f"{name}.weight"], (2, 3, 1, 0))  # OIHW -> HWIO
        conv.set_weights([kernel, w[f"{name}.bias"]])
    fc = w["classifier.weight"]  # [10, C*H*W] in torch's CHW order
    fc = fc.reshape(10, 32, 2, 2).transpose(0, 2, 3, 1).reshape(10, -1)  # -> HWC order
    dense.set_weights([fc.T, w["classifier.bias"]])
    return model


def run_tflite(path: Path, x_nhwc: np.ndarray) -> np.ndarray:
    """Logits (float) of a .tflite model, quantizing input and dequantizing output if int8."""
    import tensorflow as tf

    interp = tf.lite.Interpreter(model_path=str(path))
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    interp.resize_tensor_input(inp["index"], list(x_nhwc.shape))
    interp.allocate_tensors()
    feed = x_nhwc
    if inp["dtype"] == np.int8:
        scale, zero = inp["quantization"]
        feed = np.clip(np.round(x_nhwc / scale) + zero, -128, 127).astype(np.int8)
    interp.set_tensor(inp["index"], feed)
    interp.invoke()
    y = interp.get_tensor(out["index"])
    if out["dtype"] == np.int8:
        scale, zero = out["quantization"]
        y = (y.astype(np.float32) - zero) * scale
    return np.asarray(y)


def full_integer(model: Any, samples: np.ndarray) -> bytes:
    """Full-integer conversion: int8 weights, activations, input and output."""
    import tensorflow as tf

    def representative() -> Any:
        for sample in samples:
            yield [sample[None].astype(np.float32)]

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    result: bytes = conv.convert()
    return result


def build_mobilenet(out: Path) -> None:
    """FP32 and full-integer MobileNetV2 (random weights) for speed measurement."""
    import tensorflow as tf

    model = tf.keras.applications.MobileNetV2(input_shape=(224, 224, 3), weights=None)
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mobilenet_fp32.tflite").write_bytes(
        tf.lite.TFLiteConverter.from_keras_model(model).convert()
    )
    samples = rng.random((16, 224, 224, 3), dtype=np.float32)
    (out / "mobilenet_int8.tflite").write_bytes(full_integer(model, samples))
    print(f"wrote {out / 'mobilenet_fp32.tflite'} and {out / 'mobilenet_int8.tflite'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", type=Path, default=REPO / "lepton" / "models" / "artifacts")
    parser.add_argument("--mobilenet", type=Path, help="also build MobileNetV2 models here")
    args = parser.parse_args(argv)

    import onnxruntime as ort
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    splits = digits_splits()

    def to_nhwc(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))

    x_test, y_test = to_nhwc(splits.test.x), splits.test.y

    onnx_path = args.artifacts / "digits_fp32.onnx"
    model = keras_digits(onnx_weights(onnx_path))
    ref = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ref_logits = ref.run(None, {"input": splits.test.x})[0]
    diff = float(np.max(np.abs(model.predict(x_test, verbose=0) - ref_logits)))
    if diff > MAX_LOGIT_DIFF:
        raise SystemExit(f"Keras model differs from the ONNX model by {diff} (> {MAX_LOGIT_DIFF})")

    fp32 = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    int8 = full_integer(model, to_nhwc(splits.calibration.x))

    out_fp32 = args.artifacts / "digits_fp32.tflite"
    out_int8 = args.artifacts / "digits_int8.tflite"
    out_fp32.write_bytes(fp32)
    out_int8.write_bytes(int8)
    acc = {
        p.name: float(np.mean(run_tflite(p, x_test).argmax(axis=1) == y_test))
        for p in (out_fp32, out_int8)
    }
    report = {
        "source": onnx_path.name,
        "keras_vs_onnx_max_abs_logit_diff": diff,
        "accuracy_fp32": acc[out_fp32.name],
        "accuracy_int8": acc[out_int8.name],
        "drop_points": round((acc[out_fp32.name] - acc[out_int8.name]) * 100, 6),
        "eval_samples": len(y_test),
        "size_fp32": len(fp32),
        "size_int8": len(int8),
        "calibration_samples": len(splits.calibration),
        "tensorflow": tf.__version__,
    }
    (args.artifacts / "digits_tflite.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    if args.mobilenet:
        build_mobilenet(args.mobilenet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
