"""The report of tools/benchmark.py: its result dict as a markdown page (benchmark.md).

Kept apart from the measuring code: it reads nothing but the dict (benchmark.json holds the same),
so a report can be rewritten from a saved run without measuring again.
"""

from engine.costs import PARTS

OVERHEAD_TARGET_PCT = 10.0  # DDPS step vs student step + teacher forward
GALLERY_IMAGES = {"CUHK-SYSU": 6978, "PRW": 6112}


def format_gflops(flops):
    return f"{flops / 1e9:,.1f}"


def format_ms(seconds):
    return f"{seconds * 1e3:,.0f}" if seconds >= 0.1 else f"{seconds * 1e3:,.1f}"


def _n(x):
    return f"{x:,}"


def _timings(t):
    """median | min | max cells, in ms."""
    return f"{format_ms(t['median_s'])} | {format_ms(t['min_s'])} | {format_ms(t['max_s'])}"


def _peak(t):
    return "-" if t["peak_gib"] is None else f"{t['peak_gib']} GiB"


def _model_table(models, key, header, row, after=("",)):
    """A report section with one row per model that measured `key` (nothing if none did):
    ``header(first model's entry)`` lines, then ``row(name, entry)`` per model, then `after`."""
    measured = [(name, v[key]) for name, v in models.items() if key in v]
    if not measured:
        return []
    return header(measured[0][1]) + [row(name, entry) for name, entry in measured] + list(after)


def markdown(result):
    m, s = result["machine"], result["settings"]
    lines = ["# DDPS benchmark: model sizes, FLOPs and speed", ""]
    if s["quick"]:
        lines += ["**--quick run: tiny sizes and settings (a test of the tool); the timings and FLOPs below "
                  "are not those of the real models. Parameter counts are.**", ""]
    lines += ["| machine | |", "|---|---|",
              f"| CPU | {m['cpu']} ({m['cpu_cores']} cores visible, torch threads: {m['torch_threads']}) |"]
    if "memory_gib" in m:
        lines.append(f"| memory | {m['memory_gib']} GiB (peak resident memory of this run: "
                     f"{m.get('peak_rss_gib', '?')} GiB) |")
    if "gpu" in m:
        lines.append(f"| GPU | {m['gpu']} (CUDA {m['cuda']}) |")
    env = m.get("environment") or {}
    lines += [f"| device | {m['device']} |",
              "| allocator / threading environment | "
              + (", ".join(f"`{k}={v}`" for k, v in sorted(env.items())) or "none set (glibc malloc defaults)") + " |",
              f"| torch / torchvision / Python | {m['torch']} / {m['torchvision']} / {m['python']} |",
              f"| load average (1, 5, 15 min) at start / end | {m.get('load_average_start')} / "
              f"{m.get('load_average_end')} |",
              f"| date | {m['date']} |", f"| command | `{m['command']}` |", ""]
    lines += ["Models: random weights, built from `configs/cuhk_sysu/<backbone>/base.yaml` (DDPS: `ddps.yaml`) "
              "with `BACKBONE_PRETRAIN False`; FROZENBN2d as in each config. Timings: median of "
              f"{s['repeats']} run(s) after {s['warmup']} warm-up run(s), wall clock"
              + (", with torch.cuda.synchronize" if m["device"].startswith("cuda") else "") + ".", ""]
    models = result["models"]

    def params_header(_first):
        return ["## Parameters", "",
                "| model | config | trunk norm | total | trainable | backbone.body | backbone.fpn | rpn | "
                "roi_heads | SPEC 4.2 |", "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]

    def params_row(name, p):
        parts = " | ".join(_n(p["parts"][k]["total"]) + ("" if p["parts"][k]["trainable"] == p["parts"][k]["total"]
                                                        else f" ({_n(p['parts'][k]['trainable'])} trainable)")
                           for k in PARTS)
        return (f"| {name} | `{p['config']}` | {p['norm']} | {_n(p['total'])} | {_n(p['trainable'])} | "
                f"{parts} | {'equal' if p['matches_spec'] else 'DIFFERS: ' + _n(p['spec_total'])} |")

    lines += _model_table(models, "params", params_header, params_row, [
        "", "Parameters only (buffers such as FrozenBatchNorm2d statistics and the OIM tables "
        "LUT 5532 x 256 and CQ 5000 x 256 are not counted). Not trainable: the frozen stem "
        "(conv1, bn1) of the ResNets (FREEZE).", ""])

    def flops_header(size):
        return ["## FLOPs of one inference forward", "",
                f"One image 3 x {size['input'][1]} x {size['input'][2]} (padded by the transform to "
                f"{size['padded'][0]} x {size['padded'][1]}), eval mode; GFLOPs = 10^9 FLOPs, "
                "FLOPs = 2 x multiply-accumulates, counted by torch.utils.flop_counter.FlopCounterMode "
                "for convolutions and matrix products (RoIAlign, NMS, element-wise ops, softmax not "
                "counted). **Backbone + FPN is deterministic** (it depends on the input size only); the "
                "RPN and RoI-head figures depend on how many proposals and detections the weights "
                "produce: with random weights they are indicative only (detections given).", "",
                "| model | backbone + FPN (deterministic) | whole forward | backbone.body | backbone.fpn | "
                "rpn | roi_heads | detections |", "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def flops_row(name, f):
        return (f"| {name} | {format_gflops(f['backbone_fpn'])} | {format_gflops(f['total'])} | "
                + " | ".join(format_gflops(f["parts"][k]) for k in PARTS) + f" | {f['detections']} |")

    lines += _model_table(models, "flops", flops_header, flops_row)

    def inference_header(first):
        size = first["size"]
        return ["## Inference time per image", "",
                f"One image 3 x {size[0]} x {size[1]}, eval mode, torch.no_grad, batch 1 (detection + "
                "embeddings). The gallery columns multiply it by the number of gallery images (an "
                "estimate of the model's share of an evaluation; the query side comes on top).", "",
                "| model | ms / image | min | max | CUHK-SYSU gallery (6,978 images), est. | "
                "PRW gallery (6,112), est. | peak GPU memory |",
                "|---|---:|---:|---:|---:|---:|---:|"]

    def inference_row(name, t):
        return (f"| {name} | {_timings(t)} | "
                f"{t['median_s'] * GALLERY_IMAGES['CUHK-SYSU'] / 60:,.1f} min | "
                f"{t['median_s'] * GALLERY_IMAGES['PRW'] / 60:,.1f} min | {_peak(t)} |")

    lines += _model_table(models, "inference", inference_header, inference_row)

    def train_header(t0):
        return ["## Training step, single model", "",
                f"Batch of {t0['batch']} synthetic images 3 x {t0['size'][0]} x {t0['size'][1]} (INPUT.MIN_SIZE/"
                "MAX_SIZE set to keep that size) with 4 random person boxes each (3 labeled, 1 unlabeled); "
                "forward + backward + gradient clipping + SGD step, the model's base.yaml RPN / RoI "
                "settings.", "",
                "| model | ms / step | min | max | ms / image | peak GPU memory |", "|---|---:|---:|---:|---:|---:|"]

    def train_row(name, t):
        return f"| {name} | {_timings(t)} | {format_ms(t['median_s'] / t['batch'])} | {_peak(t)} |"

    lines += _model_table(models, "train", train_header, train_row)

    ddps = result.get("ddps", {})
    if ddps:
        d0 = next(iter(ddps.values()))
        lines += ["## DDPS distillation step", "",
                  f"Batch of {d0['batch']} images 3 x {d0['size'][0]} x {d0['size'][1]}, the student's "
                  "`ddps.yaml` (student and RPN / RoI settings as in that file), a freshly built resnet50 "
                  "teacher (random weights, no checkpoint). Student step: the same student module trained "
                  "alone; teacher forward: what the distiller asks of the teacher, without gradients, on "
                  "the student's transformed batch: the outputs the DDPS terms declare (its FPN maps, its "
                  "logits on the sampled proposals, its embeddings and OIM logits on the sampled "
                  "second-stage boxes). "
                  "Overhead = DDPS step - (student step + teacher forward), in % of the latter; target "
                  f"<= {OVERHEAD_TARGET_PCT:.0f}% (judged on the wall-clock medians). Measured in interleaved "
                  "rounds. The last columns: the same ratio in CPU time of this process (user + system, all "
                  "threads), which other jobs on a shared CPU disturb less than the wall clock, and the "
                  "system-time part of the overhead (on the CPU mostly page faults of large fresh "
                  "allocations: see the environment in the machine table).", "",
                  "| student | student norm | student step (ms) | teacher forward (ms) | sum (ms) | DDPS step (ms) | "
                  "overhead (ms) | overhead | target met | overhead in process CPU time | of which system "
                  "time (ms) |", "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
        for name, r in ddps.items():
            s, t, d = (r[k]["median_s"] for k in ("student_step", "teacher_forward", "ddps_step"))
            lines.append(f"| {name} | {r['student_norm']} | {format_ms(s)} | {format_ms(t)} | {format_ms(s + t)} | {format_ms(d)} | "
                         f"{format_ms(r['overhead_s']) if r['overhead_s'] >= 0 else '-' + format_ms(-r['overhead_s'])} | "
                         f"{r['overhead_pct']:+.1f}% | {'yes' if r['target_met'] else 'NO'} | "
                         f"{r['cpu_overhead_pct']:+.1f}% | {r['system_overhead_s'] * 1e3:+,.0f} |")
        lines += ["", "### Distillation terms alone (forward + backward, median ms)", "",
                  "Each term on the recorded batch, with detached student tensors (only the term's own "
                  "graph runs backwards); indented rows are parts of the row above them.", "",
                  "| term | " + " | ".join(ddps) + " |", "|---|" + "---:|" * len(ddps)]
        keys = list(dict.fromkeys(k for r in ddps.values() for k in r["components_s"]))
        for k in keys:
            cells = " | ".join(format_ms(r["components_s"][k]) if k in r["components_s"] else "-" for r in ddps.values())
            label = k.replace("  ", "&nbsp;&nbsp;&nbsp;&nbsp;", 1) if k.startswith("  ") else k
            lines.append(f"| {label} | {cells} |")
        top = [k for k in keys if not k.startswith("  ")]
        cells = " | ".join(format_ms(sum(r["components_s"].get(k, 0.0) for k in top)) for r in ddps.values())
        lines += [f"| **sum of the terms** | {cells} |",
                  "| (overhead measured above) | " + " | ".join(format_ms(r["overhead_s"]) for r in ddps.values()) + " |",
                  "", "Batch contents (sampled first-stage proposals, sampled second-stage boxes, foreground "
                  "boxes scored by the teacher's OIM over LUT + CQ columns): " + "; ".join(
                      f"{name} {r['proposals']}, {r['reid_boxes']}, {r.get('cd_boxes', '-')} x "
                      f"{r.get('oim_columns', '-')}" for name, r in ddps.items()) + ".", ""]
        for name, r in ddps.items():
            if "profile" not in r:
                continue
            lines += [f"### Profile, {name} (torch.profiler, one step each, {r['profile']['DDPS step']['clock']} "
                      "time)", "", "Labelled regions (inclusive time; forward regions exclude their backward, "
                      "which runs inside 'step: backward'):", "",
                      "| region | student step (ms) | DDPS step (ms) |", "|---|---:|---:|"]
            st, dd = r["profile"]["student step"]["regions_ms"], r["profile"]["DDPS step"]["regions_ms"]
            for k in sorted(set(st) | set(dd), key=lambda x: (not x.startswith("step:"), x)):
                a = f"{st[k]['ms']:,.1f}" if k in st else "-"
                b = "-"
                if k in dd:
                    b = f"{dd[k]['ms']:,.1f}" + (f" ({dd[k]['calls']} calls)" if dd[k]["calls"] > 1 else "")
                lines.append(f"| {k} | {a} | {b} |")
            lines += ["", "Top operators of the DDPS step by self time:", "", "| operator | calls | self ms |",
                      "|---|---:|---:|"]
            for op in r["profile"]["DDPS step"]["top_ops"]:
                lines.append(f"| `{op['op']}` | {op['calls']} | {op['self_ms']:,.1f} |")
            lines.append("")

    ev = result.get("evaluation")
    if ev:
        lines += ["## Evaluation protocols (engine.evaluation)", "",
                  f"Source: {ev['source']}. Wall time of the protocol code on precomputed detections and "
                  "features (the model's inference is not included; see the gallery estimates above). The "
                  "metrics are those of bench_eval's synthetic features, a sanity check only.", ""]
        if "sizes" in ev:
            lines += ["Sizes (gallery images, queries): " + "; ".join(
                f"{k} {_n(a)} / {_n(b)}" for k, (a, b) in ev["sizes"].items()), ""]
        lines += ["| dataset | protocol | seconds | result |", "|---|---|---:|---|"]
        for r in ev["rows"]:
            res = (f"mAP {r['mAP']:.3f}, top-1 {r['top1']:.3f}" if "mAP" in r
                   else f"recall {r['recall']:.3f}, AP {r['ap']:.3f}")
            lines.append(f"| {r['dataset']} | {r['setting']} | {r['seconds']:.3f} | {res} |")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main
