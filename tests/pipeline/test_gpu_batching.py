"""The GPU's way through the networks gives the CPU's results: patches and crops in batches of a
fixed shape, the refiner's boxes padded into one batch under a mask, and the host's per-vertebra
work on threads. Run on the CPU by asking for the GPU's batch sizes and thread count."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from pipeline.segmentation.crops import reference_grid
from tests.pipeline.synthetic import box_spine


class _Shapes(torch.nn.Module):
    """A per-sample network (convolution, instance norm) that records the batch shapes it saw."""

    def __init__(self, cin: int = 1, cout: int = 3, dims: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
        norm = torch.nn.InstanceNorm3d if dims == 3 else torch.nn.InstanceNorm2d
        self.net = torch.nn.Sequential(conv(cin, 4, 3, padding=1), norm(4), torch.nn.LeakyReLU(0.1),
                                       conv(4, cout, 3, padding=1))
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape))
        return self.net(x)


def test_patch_batches_blend_to_the_heatmaps_of_one_patch_at_a_time():
    from pipeline.localization.infer import predict_heatmaps

    a = np.random.default_rng(0).normal(size=(30, 26, 22)).astype(np.float32)
    net = _Shapes()
    one = predict_heatmaps(net, a, (16, 12, 12), pad_value=-1.0, overlap=0.25, batch=1)
    net.seen.clear()
    many = predict_heatmaps(net, a, (16, 12, 12), pad_value=-1.0, overlap=0.25, batch=5)
    assert one.shape == (3,) + a.shape
    np.testing.assert_allclose(many, one, atol=1e-5)
    # 3 x 3 x 3 = 27 patches: six calls of 5, the last one filled up to the same shape
    assert net.seen == [(5, 1, 16, 12, 12)] * 6


def test_fixed_shape_batches_fill_the_last_one_and_drop_what_was_added():
    from pipeline.nets.batched import forward_batched

    x = np.random.default_rng(1).normal(size=(7, 1, 8, 8, 8)).astype(np.float32)
    net = _Shapes()
    plain = forward_batched(net, x, "cpu", 3)
    assert [s[0] for s in net.seen] == [3, 3, 1]
    net.seen.clear()
    fixed = forward_batched(net, x, "cpu", 3, fixed_shape=True)
    assert [s[0] for s in net.seen] == [3, 3, 3] and fixed.shape == plain.shape == (7, 3, 8, 8, 8)
    np.testing.assert_allclose(fixed, plain, atol=1e-5)


def _refiner_case():
    from pipeline.segmentation.model import ShallowRefiner

    ct, _, gt = box_spine(levels=("L1", "L2", "L3"), spacing=(1.5, 1.5, 2.0))
    torch.manual_seed(0)
    refiner = ShallowRefiner(width=6)
    torch.nn.init.normal_(refiner.out.weight, std=0.5)       # a trained refiner: not the identity
    fgs, crops = [], []
    for k, v in enumerate(gt["vertebrae"]):
        crop = reference_grid(v["centroid_mm"], 24, 2.0)
        fg = np.zeros((24, 24, 24), np.float32)
        fg[8:14 + 2 * k, 8:16, 6:18 - 2 * k] = 0.9           # boxes of different sizes
        fg[7, 8:16, 6:12] = 0.3
        fgs.append(fg)
        crops.append(crop)
    fgs.append(np.zeros((24, 24, 24), np.float32))            # nothing found: no box
    crops.append(reference_grid(gt["vertebrae"][0]["centroid_mm"], 24, 2.0))
    return ct, gt, refiner, fgs, crops


def test_refiner_boxes_padded_into_one_batch_get_the_values_they_get_alone():
    from pipeline.segmentation.refine import refine_input, refine_many

    ct, _, refiner, fgs, crops = _refiner_case()
    alone = refine_many(refiner, ct, fgs, crops, "cpu", batch=1)
    together = refine_many(refiner, ct, fgs, crops, "cpu", batch=2)
    assert alone[-1] is None and together[-1] is None
    shapes = {a[0].shape for a in alone[:-1]}
    assert len(shapes) > 1                                    # the padding had work to do
    for a, b in zip(alone[:-1], together[:-1]):
        assert a[0].shape == b[0].shape and a[1].GetOrigin() == b[1].GetOrigin()
        np.testing.assert_allclose(b[0], a[0], atol=1e-5)
    # without the mask the padding (zeros in, not zeros after a hidden layer's bias) would leak
    # into the border of a smaller box
    x0, _ = refine_input(ct, fgs[0], crops[0])
    big = np.zeros((1, 2) + tuple(n + 8 for n in x0.shape[1:]), np.float32)
    big[(0, slice(None)) + tuple(slice(0, n) for n in x0.shape[1:])] = x0
    with torch.no_grad():
        own = refiner(torch.from_numpy(x0[None]))[0, 0]
        leaked = refiner(torch.from_numpy(big))[0, 0, :x0.shape[1], :x0.shape[2], :x0.shape[3]]
        masked = refiner(torch.from_numpy(big),
                         _box_mask(big.shape, x0.shape))[0, 0, :x0.shape[1], :x0.shape[2], :x0.shape[3]]
    assert float((leaked - own).abs().max()) > 0.01            # logits: the padding leaks in
    assert float((masked - own).abs().max()) < 1e-4            # the mask stops it


def _box_mask(shape, inner):
    m = torch.zeros((shape[0], 1) + tuple(shape[2:]))
    m[(slice(None), slice(None)) + tuple(slice(0, n) for n in inner[1:])] = 1.0
    return m


def test_host_threads_change_nothing_in_the_merged_label_map(monkeypatch):
    import pipeline.host_threads as ht
    from pipeline.segmentation.infer import segment
    from pipeline.segmentation.model import SegmentationModel

    ct, gt, refiner, _, _ = _refiner_case()
    model = SegmentationModel({"base": 4, "depth": 2}, {"width": 6})
    model.refiner = refiner
    torch.nn.init.constant_(model.coarse.head.bias, 0.0)
    with torch.no_grad():
        model.coarse.head.bias[1] = 2.0                      # foreground everywhere in the crop
    cents = [(v["label"], v["centroid_mm"]) for v in gt["vertebrae"]]
    one = segment(ct, cents, model, "cpu", size=24, spacing_mm=2.0)
    assert ht.host_threads("cpu") == 1
    monkeypatch.setattr(ht, "host_threads", lambda device: 3)
    threaded = segment(ct, cents, model, "cpu", size=24, spacing_mm=2.0)
    a, b = sitk.GetArrayFromImage(one.label_map), sitk.GetArrayFromImage(threaded.label_map)
    assert (a > 0).sum() > 1000
    np.testing.assert_array_equal(a, b)
    assert [v.voxels for v in one.vertebrae] == [v.voxels for v in threaded.vertebrae]


def test_host_map_keeps_the_order_of_its_items(monkeypatch):
    import time

    import pipeline.host_threads as ht

    monkeypatch.setattr(ht, "host_threads", lambda device: 4)
    out = ht.host_map(lambda k: (time.sleep(0.01 * (5 - k)), k)[1], range(6), "cuda")
    assert out == list(range(6))


def test_compared_weight_files_go_to_the_evaluation_device():
    """`spine-node evaluate --localization A --localization B --device cuda` loads the files onto the CPU; the
    networks must follow the inputs to the device (a GPU run failed on exactly this)."""
    import pipeline.evaluate as ev

    moved = []

    class Recording(torch.nn.Module):
        def to(self, *args, **kwargs):
            moved.append(args[0] if args else kwargs.get("device"))
            return self

    ev.compare_localization([], {"a": Recording(), "shipped": None}, device="cpu")
    assert moved == [torch.device("cpu")]
