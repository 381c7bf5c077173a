"""Evaluation of a distilled student: k-NN, zero-shot, linear-probe segmentation, SAM drop-in, fidelity, throughput.

Submodules import heavy libraries (open_clip, segment_anything, matplotlib): names load on first use, so
importing the package (the trainer does, for run_periodic_eval) stays cheap.
"""

_LAZY = {
    "ClassificationSet": "radio_scale.eval.datasets",
    "EvalReport": "radio_scale.eval.report",
    "LinearSegHead": "radio_scale.eval.segprobe",
    "ModelLoadError": "radio_scale.eval.loading",
    "ProbeConfig": "radio_scale.eval.segprobe",
    "SegmentationSet": "radio_scale.eval.datasets",
    "ThroughputResult": "radio_scale.eval.throughput",
    "build_zeroshot_classifier": "radio_scale.eval.zeroshot",
    "classification_set": "radio_scale.eval.datasets",
    "count_flops": "radio_scale.eval.throughput",
    "decode_box_masks": "radio_scale.eval.sam_dropin",
    "digits_on_photos": "radio_scale.eval.datasets",
    "evaluate_sam_dropin": "radio_scale.eval.sam_dropin",
    "evaluate_segprobe": "radio_scale.eval.segprobe",
    "evaluate_zeroshot": "radio_scale.eval.zeroshot",
    "extract_features": "radio_scale.eval.knn",
    "flop_crosscheck": "radio_scale.eval.throughput",
    "knn_classify": "radio_scale.eval.knn",
    "knn_scores": "radio_scale.eval.knn",
    "load_segmentation_folder": "radio_scale.eval.datasets",
    "load_student": "radio_scale.eval.loading",
    "log_to_mlflow": "radio_scale.eval.report",
    "mask_iou": "radio_scale.eval.sam_dropin",
    "mean_iou": "radio_scale.eval.segprobe",
    "measure_matmul_peak": "radio_scale.eval.throughput",
    "measure_throughput": "radio_scale.eval.throughput",
    "pca_pair": "radio_scale.eval.pictures",
    "plot_loss_curves": "radio_scale.eval.pictures",
    "plot_pca_maps": "radio_scale.eval.pictures",
    "read_report": "radio_scale.eval.report",
    "run_periodic_eval": "radio_scale.eval.report",
    "sam_decoder_of": "radio_scale.eval.sam_dropin",
    "segmentation_set": "radio_scale.eval.datasets",
    "spatial_fidelity": "radio_scale.eval.fidelity",
    "summary_fidelity": "radio_scale.eval.fidelity",
    "teacher_fidelity": "radio_scale.eval.fidelity",
    "topk_accuracy": "radio_scale.eval.knn",
    "train_linear_probe": "radio_scale.eval.segprobe",
    "write_segmentation_folder": "radio_scale.eval.datasets",
    "zeroshot_classify": "radio_scale.eval.zeroshot",
    # dataset scale: streamed splits, many processes (accelerate)
    "CocoInstances": "radio_scale.eval.segdata",
    "StreamingTopK": "radio_scale.eval.scale",
    "classification_splits": "radio_scale.eval.streams",
    "knn_streaming": "radio_scale.eval.scale",
    "seg_splits": "radio_scale.eval.segdata",
    "segprobe_streaming": "radio_scale.eval.scale",
    "zeroshot_streaming": "radio_scale.eval.scale",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'radio_scale.eval' has no attribute '{name}'")
