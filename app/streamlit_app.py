"""EGT Explorer: ``streamlit run app/streamlit_app.py``.

A thin page over `egt_core`: pick a baseline/EGT checkpoint pair and an image, see every exit's
explanation, how well it agrees with the final exit, and which exit answers at a threshold.
Computation lives in `app/logic.py`; layout in `app/views.py`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

# `streamlit run` puts app/ on sys.path, not the repo root that the `app` package lives in.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import streamlit as st  # noqa: E402

from app import logic, views  # noqa: E402
from egt_core.checkpoints import CheckpointError  # noqa: E402
from egt_core.images import ImageLoadError  # noqa: E402


@st.cache_resource(max_entries=16, show_spinner="Loading the model…")
def load_bundle(path: str, mtime_ns: int) -> logic.ModelBundle:
    """One model per checkpoint file and version, shared by every session (never mutated)."""
    return logic.load_bundle(path)


@st.cache_data(max_entries=64, show_spinner="Explaining every exit…")
def analyse(
    image_key: str,
    name: str,
    model_ids: tuple[tuple[str, str, int], ...],
    method: str,
    target: int | None,
    invert: bool,
    _data: bytes,
    _entries: tuple[logic.ModelEntry, ...],
) -> logic.ImageAnalysis:
    """Maps and scores for one image and settings; keyed by the bytes' hash, not the bytes."""
    models = [
        (e, load_bundle(str(e.path), mtime))
        for e, (_, _, mtime) in zip(_entries, model_ids, strict=True)
    ]
    return logic.analyse_image(
        _data, models, name=name, method=method, target=target, invert=invert
    )


@st.cache_data(max_entries=8, show_spinner=False)
def sample_thumbnails(dataset: str) -> tuple[list[bytes], list[str]]:
    samples = logic.list_samples(dataset)
    return [s.path.read_bytes() for s in samples], [s.label for s in samples]


def _use(source: str) -> None:
    st.session_state["source"] = source


def choose_image(settings: views.Settings) -> tuple[bytes, str, str | None, bool] | None:
    """The image to analyse: ``(bytes, name, true label or None, is_upload)``."""
    dataset = settings.group.dataset
    samples = logic.list_samples(dataset)
    st.session_state.setdefault("source", views.SOURCES[0] if samples else views.SOURCES[1])
    left, right = st.columns([3, 2], gap="large")
    with left:
        st.markdown("**Test images** (true label shown)")
        if samples:
            thumbs, labels = sample_thumbnails(dataset)
            st.image(thumbs, caption=[f"{i}" for i in range(len(thumbs))], width=44)
            pick = st.selectbox(
                "Test image",
                range(len(samples)),
                format_func=lambda i: f"{i} · {samples[i].label}",
                key=f"sample_{dataset}",
                on_change=_use,
                args=(views.SOURCES[0],),
                label_visibility="collapsed",
            )
        else:
            st.info(f"No test images ship for {logic.dataset_label(dataset)}: upload one.")
            pick = None
    with right:
        files = st.file_uploader(
            "Or upload your own",
            type=views.UPLOAD_TYPES,
            accept_multiple_files=True,
            key="uploads",
            on_change=_use,
            args=(views.SOURCES[1],),
            help="Nothing is stored: images are decoded in memory. Several files: pick one below.",
        )
    source = st.segmented_control("Show the maps of", views.SOURCES, key="source")
    if source == views.SOURCES[1]:
        if not files:
            st.info("Upload an image above (PNG, JPEG, WebP, BMP, GIF or TIFF).")
            return None
        chosen = files[0]
        if len(files) > 1:
            names = [f.name for f in files]
            i = st.selectbox(
                "Uploaded file to show",
                range(len(files)),
                format_func=names.__getitem__,
                key="upload_pick",
            )
            chosen = files[i]
        return chosen.getvalue(), chosen.name, None, True
    if pick is None:
        return None
    sample = samples[pick]
    return sample.path.read_bytes(), sample.path.name, sample.label, False


def explore(settings: views.Settings) -> None:
    group = settings.group
    views.what_am_i_looking_at(settings, _num_exits(group))
    picked = choose_image(settings)
    if picked is None:
        return
    data, name, true_label, is_upload = picked
    entries = tuple(group.models)
    model_ids = tuple((e.key, str(e.path), e.mtime_ns) for e in entries)
    try:
        bundles = {e.key: load_bundle(str(e.path), e.mtime_ns) for e in entries}
    except CheckpointError as e:
        st.error(f"Could not load the checkpoint: {e}")
        return
    t0, wall = time.perf_counter(), time.time()
    try:
        analysis = analyse(
            logic.digest(data),
            name,
            model_ids,
            settings.method,
            settings.target,
            settings.invert and is_upload,
            data,
            entries,
        )
        decisions = {
            m.key: logic.decide(bundles[m.key], m.tensor, settings.threshold)
            for m in analysis.models
        }
    except ImageLoadError as e:
        st.error(f"Could not use {name!r}: {e}")
        return
    except CheckpointError as e:
        st.error(f"Could not load the checkpoint: {e}")
        return
    elapsed = time.perf_counter() - t0
    classes = group.classes
    shown = settings.shown(analysis)

    explained = (
        "the predicted class"
        if settings.target is None
        else f"class **{classes[settings.target]}**"
    )
    truth = f" · true label **{true_label}**" if true_label else ""
    w, h = analysis.original_size
    cached = analysis.created < wall
    timing = (
        f"maps from cache (first computed in {analysis.seconds:.2f} s)"
        if cached
        else f"computed in {elapsed:.2f} s"
    )
    shown_name = analysis.name.replace("`", "'")  # a file name cannot break the markdown
    st.caption(
        f"`{shown_name}` ({w}×{h} {analysis.original_mode}){truth} · each exit explains "
        f"{explained} · {timing}"
    )
    views.headline(shown, decisions)
    cols = st.columns(len(shown), gap="large") if len(shown) > 1 else [st.container()]
    for col, m in zip(cols, shown, strict=True):
        with col:
            views.model_panel(m, decisions[m.key], bundles[m.key], classes, settings)

    numbers = logic.summary(
        analysis,
        decisions,
        classes,
        threshold=settings.threshold,
        checkpoints={e.key: e.path.name for e in entries},
    )

    def make_png() -> bytes:
        return logic.compose_png(
            analysis,
            decisions,
            classes,
            alpha=settings.alpha,
            colormap=settings.colormap,
            threshold=settings.threshold,
        )

    views.downloads(make_png, numbers, logic.safe_stem(name))


def _num_exits(group: logic.CheckpointGroup) -> int:
    return int(group.meta.get("num_exits") or 3)


def main() -> None:
    st.set_page_config(page_title="EGT Explorer", page_icon="🔎", layout="wide")
    st.set_option("client.toolbarMode", "minimal")  # no "Deploy" button in a shipped app
    logic.use_app_threads()
    found = logic.discover(logic.checkpoint_root())
    settings = views.sidebar(found)
    if settings is None:
        st.title("EGT Explorer")
        views.no_checkpoints(found)
        return
    explore_tab, dataset_tab = st.tabs(
        ["Explore an image", "Dataset results"], key="tab", on_change="rerun"
    )
    if explore_tab.open is not False:
        with explore_tab:
            explore(settings)
    if dataset_tab.open:
        with dataset_tab:
            views.dataset_view(settings.group)


main()
