"""Rendering: lays out what `logic` computed. No numbers are made here, only words and layout."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import streamlit as st

from egt_core.explain import COLORMAPS, EXPLAINER_LABELS, EXPLAINERS

from . import charts, logic

VIEWS = ("Baseline and EGT side by side", "Baseline only", "EGT only")
SOURCES = ("Test image", "My upload")
UPLOAD_TYPES = ["png", "jpg", "jpeg", "webp", "bmp", "gif", "tiff", "tif"]
STATE_WORDS = {  # coloured words, not badges: badges truncate in narrow columns
    "answers": ":green[**:material/check_circle: answers here**]",
    "passed": ":gray[below threshold]",
    "skipped": ":gray[not run]",
}


@dataclass
class Settings:
    group: logic.CheckpointGroup
    view: str
    threshold: float
    method: str
    target: int | None
    alpha: float
    colormap: str
    invert: bool

    def shown(self, analysis: logic.ImageAnalysis) -> list[logic.ModelAnalysis]:
        """The models the view selector asks for (both, or just one of the pair)."""
        if not self.group.is_pair or self.view == VIEWS[0]:
            return analysis.models
        key = "baseline" if self.view == VIEWS[1] else "egt"
        return [m for m in analysis.models if m.key == key]


# --------------------------------------------------------------------------- sidebar


def sidebar(found: logic.Discovery) -> Settings | None:
    """Every control except the image source; ``None`` when there is nothing to choose from."""
    sb = st.sidebar
    sb.title("EGT Explorer")
    sb.caption("Early exits and where they look, before and after explanation-guided training.")
    if not found.groups:
        _skipped(found)
        return None
    groups = {g.key: g for g in found.groups}
    key = sb.selectbox(
        "Checkpoints",
        list(groups),
        format_func=lambda k: groups[k].label,
        key="group",
        help="A folder with baseline.safetensors and egt.safetensors is shown as a pair.",
    )
    group = groups[key]
    view = VIEWS[0]
    if group.is_pair:
        view = sb.radio("Show", VIEWS, key="view")
    invert = sb.checkbox(
        "Invert uploaded image",
        value=group.dataset in logic.INVERT_BY_DEFAULT,
        key=f"invert_{group.dataset}",
        help="Fashion-MNIST shows light clothes on a black background; photos are usually the "
        "opposite. Test images are never inverted.",
    )
    sb.subheader("Early exit")
    threshold = sb.slider(
        "Exit threshold",
        0.0,
        1.0,
        0.9,
        0.01,
        key="threshold",
        help="The first exit whose confidence (max softmax) reaches this value answers.",
    )
    sb.subheader("Explanation")
    method = sb.selectbox(
        "Explainer",
        list(EXPLAINERS),
        format_func=lambda k: EXPLAINER_LABELS[k],
        key="explainer",
    )
    classes = group.classes
    target = sb.selectbox(
        "Class to explain",
        [None, *range(len(classes))],
        format_func=lambda c: "Predicted (by the final exit)" if c is None else classes[c],
        key=f"target_{group.key}",
    )
    alpha = sb.slider("Overlay opacity", 0.0, 1.0, 0.5, 0.05, key="alpha")
    colormap = sb.selectbox("Colormap", COLORMAPS, key="colormap")
    _skipped(found)
    sb.caption(f"Checkpoints from `{found.root}` (set `EGT_CHECKPOINTS` to change).")
    return Settings(group, view, threshold, method, target, alpha, colormap, invert)


def _skipped(found: logic.Discovery) -> None:
    if not found.skipped:
        return
    with st.sidebar.expander(f"Skipped checkpoints ({len(found.skipped)})"):
        for name, reason in found.skipped:
            st.markdown(f"**{name}**: {reason}")


def no_checkpoints(found: logic.Discovery) -> None:
    st.error(found.problem or "No loadable checkpoint was found.")
    st.markdown(
        f"The app looks for `<dataset>/baseline.safetensors` and `<dataset>/egt.safetensors` "
        f"under `{found.root}`. Train them with `make checkpoints`, or point the app at another "
        "folder: `EGT_CHECKPOINTS=/path/to/checkpoints streamlit run app/streamlit_app.py`."
    )
    if found.skipped:
        st.markdown("Files that were found but could not be used are listed in the sidebar.")


# --------------------------------------------------------------------------- explanations


def what_am_i_looking_at(settings: Settings, num_exits: int) -> None:
    method = settings.method
    how = METHOD_NOTES.get(method, "")
    with st.expander("What am I looking at?"):
        st.markdown(
            f"""
**Exits.** The network has {num_exits} classifiers ("exits") along its depth. An early exit
answers from the features computed so far, so an easy image can be classified after only part of
the network has run. The last exit is the ordinary classifier at the end of the full network.

**The threshold.** Exits run in order. The first one whose confidence (its highest class
probability) reaches the threshold answers, and nothing after it is computed. At threshold 0 the
first exit always answers; at 1.0 the image (almost) always goes to the final exit. The green frame
marks the answering exit, and "saves N%" is the share of the full network's FLOPs that were not
needed (the early heads that ran on the way are counted as a cost).

**The maps.** Each heatmap shows where that exit "looked" for the class being explained (by default
the final exit's prediction, so every exit explains the same class). {how}

**Consistency with the final exit.** Each early exit's map is compared with the final exit's map:
*Pearson* r (−1…1) measures whether the two maps rise and fall together; *cosine* (0…1) whether
they point the same way; *IoU* (0…1) is the overlap of their top-20% hottest pixels. 1 means the
early exit looks where the final exit looks. A flat map has no direction and scores 0.

**Baseline vs EGT.** Both checkpoints share the architecture. EGT was also trained with a loss that
pulls each early exit's map toward the final exit's, so its early answers should rest on the same
evidence: look for higher consistency scores at similar confidence.
"""
        )


METHOD_NOTES = {
    "cam": "These are the **trained CAMs**: for each exit, its head's class weights times its last "
    "feature map. This is the very map the EGT loss was trained on, computed in one forward pass.",
    "gradcam": "**Grad-CAM** weights each channel of the exit head's last feature map by the "
    "average gradient of the class score. For these heads it equals the trained CAM up to scale.",
    "gradcam++": "**Grad-CAM++** weights channels with higher-order gradient terms, which can "
    "separate several instances of a class.",
    "xgradcam": "**XGrad-CAM** weights channels by gradient times activation, normalised.",
    "layercam": "**LayerCAM** weights each pixel by its own positive gradient (finer maps).",
    "eigencam": "**Eigen-CAM** is the first principal component of the feature map: it ignores "
    "the class.",
    "hirescam": "**HiResCAM** multiplies gradients and activations element-wise before summing.",
    "scorecam": "**Score-CAM** masks the input with each channel's map and weights channels by "
    "the class score they keep (one forward pass per channel: slow).",
}
for _k in METHOD_NOTES:
    if _k != "cam":
        METHOD_NOTES[_k] += (
            " Computed with the `grad-cam` package on each exit separately (one wrapper per exit)."
        )


# --------------------------------------------------------------------------- image panel


def headline(shown: list[logic.ModelAnalysis], decisions: dict[str, logic.Decision]) -> None:
    """The comparison at a glance: agreement with the final exit and where each model answers."""
    cols = st.columns(2 * len(shown))
    base = None
    for i, m in enumerate(shown):
        score = m.mean_score("pearson")
        delta = None
        if base is not None:
            delta = f"{score - base:+.2f} vs {shown[0].label}"
        cols[i].metric(
            f"{m.label}: mean Pearson r",
            logic.fmt_score(score),
            delta=delta,
            help="Mean over the early exits of the Pearson correlation between each early "
            "exit's map and the final exit's map, for this image.",
        )
        base = score if base is None else base
    for i, m in enumerate(shown):
        d = decisions[m.key]
        saving = max(0.0, d.saving)
        cols[len(shown) + i].metric(
            f"{m.label}: answers at",
            logic.exit_name(d.exit_index, m.num_exits),
            delta=f"{saving:.0%} FLOPs saved",
            delta_color="normal" if saving > 0 else "off",
            delta_arrow="off",
        )


def model_panel(
    m: logic.ModelAnalysis,
    d: logic.Decision,
    bundle: logic.ModelBundle,
    classes: list[str],
    settings: Settings,
) -> None:
    """One model: the input, every exit's overlay, scores, the answering exit, confidences."""
    st.subheader(m.label, divider="orange" if m.key == "egt" else "gray")
    factor = logic.tile_scale(m.display.shape[0])
    border = max(3, m.display.shape[0] * factor // 32)
    cols = st.columns(1 + m.num_exits, gap="small")
    with cols[0]:
        input_tile = logic.framed(logic.upscale(m.display, factor), logic.QUIET_COLOUR, border)
        st.image(input_tile, width="stretch")
        st.markdown("**Input**")
        st.caption("as the model sees it")
    full = bundle.costs.full_path
    for k in range(m.num_exits):
        state = logic.exit_state(k, d)
        tile = logic.overlay_tile(m.display, m.maps[k], settings.alpha, settings.colormap, factor)
        frame = logic.ANSWER_COLOUR if state == "answers" else logic.QUIET_COLOUR
        with cols[k + 1]:
            st.image(logic.framed(tile, frame, border), width="stretch")
            st.markdown(
                f"**{logic.exit_name(k, m.num_exits)}**  \n"
                f"{classes[m.predictions[k]]} · {m.confidences[k]:.0%}"
            )
            score = logic.score_line(m.consistency[k]) if k < m.num_exits - 1 else "reference map"
            st.caption(f"{score}  \n{bundle.costs.answer_at(k) / full:.0%} of full-path FLOPs")
            st.markdown(STATE_WORDS[state])
    where = logic.exit_name(d.exit_index, m.num_exits)
    st.markdown(
        f":green-badge[{where} answers] **{classes[d.prediction]}** at {d.confidence:.0%} "
        f"confidence: {logic.saving_text(d)}."
    )
    labels = [
        logic.exit_name(k, m.num_exits).replace(" (final)", " final") for k in range(m.num_exits)
    ]
    fig = charts.confidence_chart(m.confidences, settings.threshold, d.exit_index, labels)
    st.plotly_chart(fig, key=f"conf_{m.key}", config={"displayModeBar": False})


def downloads(make_png: Callable[[], bytes], numbers: dict[str, Any], stem: str) -> None:
    row = st.container(horizontal=True)
    row.download_button(
        "Download panel (PNG)",
        data=make_png,
        file_name=f"egt-{stem}.png",
        mime="image/png",
        icon=":material/image:",
        key="dl_png",
        on_click="ignore",
    )
    row.download_button(
        "Download numbers (JSON)",
        data=json.dumps(numbers, indent=1),
        file_name=f"egt-{stem}.json",
        mime="application/json",
        icon=":material/data_object:",
        key="dl_json",
        on_click="ignore",
    )


# --------------------------------------------------------------------------- dataset view


def dataset_view(group: logic.CheckpointGroup) -> None:
    """Test-set results from the shipped reports only (nothing is recomputed here)."""
    reports: dict[str, dict] = {}
    for entry in group.models:
        path = logic.report_path(entry)
        report, problem = load_report_cached(str(path), logic.file_stamp(path))
        if report is None:
            st.info(
                f"**{entry.label}**: {problem} Create it with "
                f"`egt eval {entry.path.name} --out {entry.key}.report.json`; "
                "the dataset view only reads saved reports."
            )
        else:
            reports[entry.label] = report
    if not reports:
        return
    first = next(iter(reports.values()))
    st.caption(
        f"{logic.dataset_label(str(first.get('dataset', group.dataset)))} test split, "
        f"{first.get('n', '?')} images. Baseline in grey, EGT in orange."
    )
    st.markdown("##### Headline numbers")
    st.dataframe(logic.headline_table(reports), hide_index=True, width="stretch", height="content")

    c1, c2 = st.columns(2)
    c1.plotly_chart(charts.accuracy_chart(reports), key="ds_acc")
    c2.plotly_chart(charts.speedup_chart(reports), key="ds_speed")

    st.markdown("##### Exit mix")
    cols = st.columns(len(reports))
    for i, (label, rep) in enumerate(reports.items()):
        cols[i].plotly_chart(charts.exit_mix_chart(rep, label), key=f"ds_mix_{i}")

    st.markdown("##### Per-image consistency with the final exit")
    sources = [s for s in ("trained", "explainer") if _has_per_image(reports, s)]
    if not sources:
        st.info("These reports hold no per-image consistency scores.")
        return
    names = {s: _source_name(first, s) for s in sources}
    source = st.radio("Maps", sources, format_func=names.get, horizontal=True, key="ds_source")
    n_early = max(len(logic.per_image_scores(r, source)) for r in reports.values())
    cols = st.columns(max(1, n_early))
    for e in range(n_early):
        cols[e].plotly_chart(
            charts.consistency_histogram(reports, e, source), key=f"ds_hist_{source}_{e}"
        )


@st.cache_data(max_entries=32, show_spinner=False)
def load_report_cached(path: str, mtime_ns: int) -> tuple[dict | None, str | None]:
    """Reports are re-read only when the file changes."""
    return logic.load_report(path)


def _has_per_image(reports: dict[str, dict], source: str) -> bool:
    return any(any(s) for r in reports.values() for s in logic.per_image_scores(r, source))


def _source_name(report: dict, source: str) -> str:
    method = ((report.get("consistency") or {}).get(source) or {}).get("method", source)
    label = EXPLAINER_LABELS.get(method, method)
    return f"trained maps ({label})" if source == "trained" else f"independent explainer ({label})"
