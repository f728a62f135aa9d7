"""The segmentation scorer's pieces that need no server: where it takes the embedding from."""

from __future__ import annotations

import copy

from labelloop_app.activelearning.segmentation import SegmentationScorer, find_bottleneck
from labelloop_app.conf import SegmentationConf
from labelloop_app.networks import segmentation_network
from labelloop_app.synthetic import SEG_LABELS


def test_the_embedding_comes_from_the_scored_networks_own_bottleneck_even_when_ids_are_reused():
    """The study scores a fresh copy of a warm start per strategy, and the server a fresh network per model
    version: a freed network's id is often reused by the next one, which must not get the old network's module."""
    conf = SegmentationConf(labels=dict(SEG_LABELS), target_spacing=(6.0,) * 3, roi_size=(32, 32, 32))
    scorer = SegmentationScorer(conf, mc_samples=2)
    warm = segmentation_network(conf.network, conf.out_channels)
    name, _ = find_bottleneck(warm)
    for _ in range(20):
        network = copy.deepcopy(warm)
        assert scorer.bottleneck(network) is network.get_submodule(name)
        del network
