"""Figures a reader can read, checked on matplotlib's object model (not on pixels): the §5.1
particle map names its components where they are and has axes, the EBM densities have axes and a
colour bar, 8×8 digit grids are upscaled by nearest neighbour, and one run's figures count their
x axis in one unit."""

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from implicit_diffusion.models.mixture import hexagon_mixture
from implicit_diffusion.plotting import diffusion as plotting_diffusion
from implicit_diffusion.plotting import ebm as plotting_ebm
from implicit_diffusion.plotting import langevin as plotting_langevin


@pytest.fixture
def saved(monkeypatch):
    """Every figure saved while the test runs, keyed by file name (the figure functions are called
    as the experiments call them; their return value is not needed)."""
    figures: dict[str, Figure] = {}
    original = Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        figures[str(getattr(fname, "name", fname)).rsplit("/", 1)[-1]] = self
        return original(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return figures


def _means() -> np.ndarray:
    return hexagon_mixture(torch.zeros(6, dtype=torch.float64), dtype=torch.float64).means.numpy()


def _tick_texts(ax) -> tuple[list[str], list[str]]:
    ax.figure.canvas.draw()
    return ([t.get_text() for t in ax.get_xticklabels() if t.get_text()],
            [t.get_text() for t in ax.get_yticklabels() if t.get_text()])


def test_particle_map_names_each_component_at_its_centre_and_has_axes(saved, tmp_path):
    means = _means()
    rng = np.random.default_rng(0)
    w = np.full(6, 1 / 6)
    snaps = {k: rng.normal(size=(300, 2)) for k in (0, 10)}
    plotting_langevin.plot_particle_clouds(tmp_path / "particles.png", snaps, {0: w, 10: w}, means)
    panels = [ax for ax in saved["particles.png"].axes if ax.get_title()]
    assert len(panels) == 2
    for ax in panels:
        texts = {t.get_text(): np.asarray(t.get_position(), dtype=float) for t in ax.texts}
        for i in range(6):
            assert f"c{i + 1}" in texts, sorted(texts)
            # within 1% of the hexagon's radius (4) of the component mean
            np.testing.assert_allclose(texts[f"c{i + 1}"], means[i], atol=0.04)
    xt, yt = _tick_texts(panels[0])
    assert len(xt) >= 3 and len(yt) >= 3
    assert panels[0].get_xlabel() and panels[0].get_ylabel()


def test_weights_legend_names_and_colours_match_the_particle_map(saved, tmp_path):
    means = _means()
    labels = [f"c{i + 1}" for i in range(6)]
    w = np.full(6, 1 / 6)
    plotting_langevin.plot_particle_clouds(tmp_path / "particles.png", {0: np.zeros((5, 2))}, {0: w}, means)
    plotting_langevin.plot_mixture_weights(tmp_path / "weights.png", np.arange(3), np.tile(w, (3, 1)), labels)
    from matplotlib.colors import to_rgb

    ax_p = saved["particles.png"].axes[0]
    text_colour = {t.get_text(): to_rgb(t.get_color()) for t in ax_p.texts}
    ax_w = saved["weights.png"].axes[0]
    handles, names = ax_w.get_legend_handles_labels()
    assert names == labels
    for h, name in zip(handles, names):
        assert to_rgb(np.asarray(h.get_facecolor()).reshape(-1, 4)[0][:3]) == pytest.approx(text_colour[name])


def test_ebm_density_has_axes_and_a_colour_bar(saved, tmp_path):
    g = np.linspace(-3, 3, 40)
    gx, gy = np.meshgrid(g, g)
    dens = np.exp(-(gx**2 + gy**2) / 2) / (2 * np.pi)
    pts = np.random.default_rng(0).normal(size=(100, 2))
    plotting_ebm.plot_densities(tmp_path / "density.png", {"a": (dens, pts), "b": (0.5 * dens, pts)}, pts,
                                (-3.0, 3.0, -3.0, 3.0))
    fig = saved["density.png"]
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2
    bars = [ax.images[0].colorbar for ax in panels if ax.images[0].colorbar is not None]
    assert len(bars) == 1  # one colour bar for the panels, which share its scale
    assert all(ax.images[0].norm is bars[0].norm for ax in panels)
    assert bars[0].ax in fig.axes and bars[0].ax.get_ylabel()
    xt, yt = _tick_texts(panels[0])
    assert len(xt) >= 3 and len(yt) >= 3
    assert panels[0].get_xlabel() and panels[0].get_ylabel()


def _assert_nearest_upscaled(ax, base_shape: tuple[int, int], side: int) -> None:
    """The image array is ``k`` × the unscaled grid (k ≥ 8) with every k × k block constant, and a
    ``side``-pixel image is drawn at least 64 screen pixels wide."""
    array = np.asarray(ax.images[0].get_array())
    k = array.shape[0] // base_shape[0]
    assert k >= 8 and array.shape[:2] == (k * base_shape[0], k * base_shape[1]), (array.shape, base_shape)
    blocks = array.reshape(base_shape[0], k, base_shape[1], k)
    assert np.array_equal(blocks, np.broadcast_to(blocks[:, :1, :, :1], blocks.shape))
    ax.figure.canvas.draw()
    (x0, _), (x1, _) = ax.transData.transform([[-0.5, -0.5], [array.shape[1] - 0.5, -0.5]])
    assert abs(x1 - x0) / array.shape[1] * k * side >= 64 - 1e-6


def test_digit_grids_are_upscaled_by_nearest_neighbour(saved, tmp_path):
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(32, 1, 8, 8))
    plotting_diffusion.plot_image_grids(tmp_path / "samples.png", [(f"p{i}", images) for i in range(4)])
    base = plotting_diffusion.image_grid(images).shape  # 4 rows × 8 columns of 8×8, 1-pixel padding
    axes = [ax for ax in saved["samples.png"].axes if ax.images]
    assert len(axes) == 4
    for ax in axes:
        _assert_nearest_upscaled(ax, base, 8)
    plotting_ebm.plot_image_grids(tmp_path / "ebm.png", {"a": rng.uniform(-1, 1, (36, 64)),
                                                        "b": rng.uniform(-1, 1, (36, 64))})
    for ax in [ax for ax in saved["ebm.png"].axes if ax.images]:
        _assert_nearest_upscaled(ax, (6 * 9 + 1, 6 * 9 + 1), 8)


def _xlabels(fig: Figure) -> set[str]:
    return {ax.get_xlabel() for ax in fig.axes if ax.get_xlabel()}


def test_langevin_mixture_figures_count_in_one_unit(saved, tmp_path):
    from implicit_diffusion.experiments.langevin_mixture import LangevinMixtureConfig, run, save

    result = run(LangevinMixtureConfig(num_particles=100, num_steps=40, eval_every=20, snapshot_steps=(0, 40),
                                       progress=False))
    save(result, tmp_path)
    units = _xlabels(saved["reward.png"]) | _xlabels(saved["weights.png"])
    assert len(units) == 1, units
    (unit,) = units
    titles = [ax.get_title() for ax in saved["particles.png"].axes if ax.get_title()]
    assert titles and all(t.startswith(unit) for t in titles), (unit, titles)


def test_diffusion_finetune_figures_count_in_one_unit(saved, tmp_path):
    from implicit_diffusion.cli import main

    pre = tmp_path / "pre"
    assert main(["pretrain", "digits", "--set", "num_steps=2", "--set", "base_channels=8", "--set", "num_samples=4",
                 "--set", "sampling_steps=2", "--no-progress", "--out", str(pre)]) == 0
    out = tmp_path / "ft"
    assert main(["run", "diffusion-finetune", "--set", f"model='{pre / 'model.safetensors'}'", "--set", "num_steps=3",
                 "--set", "num_sampling_steps=2", "--set", "batch_size=1", "--set", "eval_every=3",
                 "--set", "eval_samples=2", "--set", "grid_images=2", "--no-progress", "--out", str(out)]) == 0
    units = _xlabels(saved["curves.png"])
    assert len(units) == 1, units
    (unit,) = units
    titles = [ax.get_title() for ax in saved["samples.png"].axes if ax.images]
    assert len(titles) >= 2 and all(t.startswith(unit) for t in titles), (unit, titles)
