"""Side-by-side throughput of the reference-style configuration and the fast default, on one device.

    python bench.py --device cpu                      # a few minutes on a 2-core CPU
    python bench.py --device cuda --steps 300         # one GPU
    python bench.py --data-dir ../shared/data         # real CIFAR-10 images (without --data-dir: ./data, else random)
    python bench.py --device cpu --fast-flags "--precision bf16"   # other main.py flags for the fast row
    python bench.py --device cpu --model-flags "--layers 2 --hidden 64 --mlp-hidden 64 --heads 4"  # another model
    python bench.py --device cuda --fast-flags "" --fast-flags "--compile-mode reduce-overhead"   # two fast rows
    python bench.py --device cuda --profile-steps 20  # also where each row's step spends its time (torch.profiler)

(a) reference: torchvision PIL pipeline in a DataLoader, explicit attention, fp32, eager.
(b) fast:      main.py's defaults: data and augmentation on the device, bf16 autocast where the hardware computes
               bf16 natively (else fp32), sdpa attention (the explicit formula on the CPU in bf16, faster there)
               and, on CUDA, torch.compile with the whole training step (Adam included) replayed as one CUDA graph.
Every row trains the same model: the default one, or the one --model-flags describes.
For each: steady-state training images/s (augmentation included, after warm-up), evaluation images/s,
peak memory, the projected time of the 200-epoch recipe, and on CUDA the achieved TFLOP/s. Then the
augmentation pipelines alone. Prints a table and writes the numbers to --json.
"""
import contextlib
import io
import itertools
import json
import os
import platform
import resource
import shlex
import sys
import time

import torch

import data
import main
from cli import OneLineErrors, nonempty_path, run_script
from models import ViTConfig, VisionTransformer, count_parameters
from trainer import Trainer, model_config_from_args

REFERENCE_FLAGS = ["--data-pipeline", "torchvision", "--attention", "math", "--precision", "fp32", "--no-compile"]
# main.py flags a row may not hold, and what to do instead
NOT_ROW_FLAGS = {
    **{flag: f"every row uses bench.py's own {flag}: pass it to bench.py"
       for flag in ("--device", "--batch-size", "--workers", "--data-dir")},
    **{flag: f"{flag} belongs to a training run, and bench.py times steps: drop it"
       for flag in ("--epochs", "--warmup-epochs", "--min-lr", "--dataset", "--out-dir", "--save-every",
                    "--write-interval", "--compare-curve", "--resume", "--eval-only", "--checkpoint")}}


def forward_flops_per_image(config: ViTConfig) -> int:
    """Multiply-add FLOPs (2 per MAC) of one image's forward pass: the matrix products only."""
    tokens, d, m = config.num_patches + 1, config.hidden, config.mlp_hidden
    patch_dim = config.in_channels * config.patch_size ** 2
    per_layer = 2 * tokens * d * 3 * d + 2 * 2 * tokens * tokens * d + 2 * tokens * d * d + 2 * 2 * tokens * d * m
    return 2 * config.num_patches * patch_dim * d + config.layers * per_layer + 2 * d * config.num_classes


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS, KiB on Linux


def subset(cifar: data.Cifar, train: int, test: int) -> data.Cifar:
    return data.Cifar(cifar.train_images[:train], cifar.train_labels[:train], cifar.test_images[:test],
                      cifar.test_labels[:test], cifar.classes)


def bench_training(name, flags, cifar, opts):
    """Images/s over a subset of steps*batch training images: `opts.warmup` untimed steps of one epoch, then one
    whole timed epoch of the subset; then the evaluation rate, after an untimed evaluation."""
    args = main.parse_args(opts.model_tokens + flags + ["--device", opts.device, "--batch-size", str(opts.batch_size),
                                                        "--workers", str(opts.workers), "--epochs", "200"])
    trainer = Trainer(args)
    trainer.build(cifar.num_classes)
    device = trainer.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    part = subset(cifar, opts.steps * opts.batch_size, opts.eval_images)
    loader = trainer.make_train_loader(part)
    trainer.network.train()
    for step, (images, labels) in enumerate(loader.epoch(1)):
        if step == opts.warmup:
            break
        trainer.train_step(images, labels.to(device), args.lr)
    synchronize(device)
    start = time.perf_counter()
    seen = 0
    for images, labels in loader.epoch(2):
        trainer.train_step(images, labels.to(device), args.lr)
        seen += len(labels)
    synchronize(device)
    train_ips = seen / (time.perf_counter() - start)

    test_images, test_labels = part.test_images.to(device), part.test_labels.to(device)
    trainer.evaluate(test_images, test_labels)  # warm-up (compiles the eval graph)
    synchronize(device)
    start = time.perf_counter()
    trainer.evaluate(test_images, test_labels)
    synchronize(device)
    eval_ips = len(test_images) / (time.perf_counter() - start)

    epoch_seconds = len(cifar.train_images) / train_ips + len(cifar.test_images) / eval_ips
    result = {"config": name, "flags": " ".join(flags) or "(defaults)", "settings": trainer.settings_label(),
              "parameters": count_parameters(trainer.model), "eval_batch_size": trainer.eval_batch_size,
              "train_images_per_s": train_ips, "eval_images_per_s": eval_ips, "peak_memory_mib": peak_memory_mib(device),
              "projected_epoch_s": epoch_seconds, "projected_200_epochs_min": 200 * epoch_seconds / 60}
    if device.type == "cuda":
        result["train_tflops"] = 3 * forward_flops_per_image(trainer.model_config) * train_ips / 1e12
    if opts.profile_steps:
        result["profile"] = profile_training(trainer, loader, opts, name)
    return result


def bench_row(name, flags, cifar, opts):
    """One row of the table; a configuration that fails (a compiler error, say) is recorded with its error
    and the other rows still run, so one broken mode does not cost a whole benchmark run on a lent GPU."""
    try:
        result = bench_training(name, flags, cifar, opts)
    except Exception as error:  # any failure of this configuration, reported rather than raised (not a Ctrl-C)
        print(f"{name} failed: {type(error).__name__}: {error}", flush=True)
        result = {"config": name, "flags": " ".join(flags) or "(defaults)", "error": f"{type(error).__name__}: {error}"}
    torch._dynamo.reset()  # each row compiles afresh, in its own mode
    return result


def profile_training(trainer, loader, opts, name):
    """torch.profiler over `opts.profile_steps` training steps on batches fetched beforehand (so the table
    shows the step, not the data pipeline): host and device time per step, the kernels launched per step,
    and a table of the operators that cost most, written beside the JSON."""
    device = trainer.device
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    else:  # quiet the profiler's start/stop lines and its "gpuGetDeviceCount failed" on a machine without a GPU
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    batches = list(itertools.islice(loader.epoch(3), opts.profile_steps))
    synchronize(device)
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as profiler:
        for images, labels in batches:
            trainer.train_step(images, labels.to(device), trainer.args.lr)
        synchronize(device)
    steps = len(batches)
    wall_ms = 1000 * (time.perf_counter() - start) / steps
    events = profiler.key_averages()
    result = {"steps": steps, "wall_ms_per_step": wall_ms, "table": f"{os.path.splitext(opts.json)[0]}-profile-{name}.txt"}
    summary = f"{name}: {steps} steps, {wall_ms:.2f} ms wall per step (profiler on)"
    if device.type == "cuda":
        kernels = device_kernels(profiler.events())
        result["device_kernel_ms_per_step"] = sum(k.self_device_time_total for k in kernels) / 1000 / steps
        result["kernels_per_step"] = len(kernels) / steps
        summary += (f", {result['device_kernel_ms_per_step']:.2f} ms of device kernels and "
                    f"{result['kernels_per_step']:.0f} kernels per step")
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(result["table"], "w") as f:
        f.write(summary + "\n" + events.table(sort_by=sort_by, row_limit=30, max_name_column_width=70))
    result["summary"] = summary
    return result


def device_kernels(events):
    """The device kernels among profiled events. The host operators and annotated ranges (a CUDA graph's
    replay, the optimizer step) carry the device time of the kernels they launched: counting them too
    would count those kernels twice (the profiler's own "Self CUDA time total" leaves them out likewise)."""
    return [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
            and not getattr(e, "is_user_annotation", False)]


def bench_augmentation(cifar, opts, device):
    """Images/s of the training augmentation alone: PIL per image in DataLoader workers vs batched on device."""
    n = opts.augment_images  # at most the training set (fit_to_data)
    images, labels = cifar.train_images[:n], cifar.train_labels[:n]
    pil = data.TorchvisionTrainLoader(images, labels, 256, seed=0, workers=opts.workers, pin_memory=False)
    start = time.perf_counter()
    count = sum(len(batch) for batch, _ in pil.epoch(1))
    pil_ips = count / (time.perf_counter() - start)

    from augment import train_augment
    on_device = images.to(device)
    generator = torch.Generator(device).manual_seed(0)
    train_augment(on_device[:1000], generator=generator)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for part in on_device.split(10_000):
        train_augment(part, generator=generator)
    synchronize(device)
    device_ips = n / (time.perf_counter() - start)
    return {"torchvision_pil_images_per_s": pil_ips, "device_batched_images_per_s": device_ips,
            "speedup": device_ips / pil_ips, "images": n}


def holds_cifar10(data_dir) -> bool:
    return os.path.isdir(os.path.join(data_dir, data.FOLDERS["cifar10"]))


def load_data(data_dir):
    if holds_cifar10(data_dir):
        return data.load_cifar("cifar10", data_dir, download=False), f"CIFAR-10 from {data_dir}"
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (60_000, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (60_000,), generator=generator)
    return data.Cifar(images[:50_000], labels[:50_000], images[50_000:], labels[50_000:],
                      [str(i) for i in range(10)]), "random images (no CIFAR-10 folder found)"


def print_table(results, augmentation, header):
    print(header)
    print(f"{'config':<10} {'train img/s':>12} {'vs ref.':>8} {'eval img/s':>11} {'peak MiB':>9} {'epoch s':>8} "
          f"{'200 ep. min':>11} {'TFLOP/s':>8}  flags")
    reference_ips = results[0].get("train_images_per_s", float("nan"))
    for r in results:
        if "error" in r:
            print(f"{r['config']:<10} failed: {r['error'][:200]}  {r['flags']}")
            continue
        tflops = f"{r['train_tflops']:.1f}" if "train_tflops" in r else "-"  # counted on CUDA only
        print(f"{r['config']:<10} {r['train_images_per_s']:>12,.0f} {r['train_images_per_s'] / reference_ips:>7.1f}x "
              f"{r['eval_images_per_s']:>11,.0f} {r['peak_memory_mib']:>9,.0f} {r['projected_epoch_s']:>8.1f} "
              f"{r['projected_200_epochs_min']:>11.1f} {tflops:>8}  {r['flags']} "
              f"({r['settings']})")
    for r in results:
        if "profile" in r:
            print(f"profile {r['profile']['summary']} ({r['profile']['table']})")
    print(f"augmentation alone ({augmentation['images']:,} images): torchvision PIL "
          f"{augmentation['torchvision_pil_images_per_s']:,.0f} img/s, device batched "
          f"{augmentation['device_batched_images_per_s']:,.0f} img/s ({augmentation['speedup']:.1f}x)")


def model_options() -> list:
    """main.py's flags that choose the model (its "model" group), which --model-flags sets for every row.
    --attention is in that group but only picks how attention is computed (same weights, same outputs): the
    reference row fixes it and the fast rows vary it, so it stays a --fast-flags flag."""
    # argparse has no public way to list a group's actions or a parser's option names
    group = next(g for g in main.build_parser()._action_groups if g.title == "model")
    return [option for action in group._group_actions for option in action.option_strings if option != "--attention"]


def options_named(tokens) -> list:
    """The main.py options that command-line tokens name, abbreviations resolved as argparse resolves them
    (--lay: --layers); an ambiguous or unknown name is left for main.py's parser to refuse."""
    options = main.build_parser()._option_string_actions
    named = []
    for name in (token.split("=", 1)[0] for token in tokens if token.startswith("--")):
        matches = [name] if name in options else [option for option in options if option.startswith(name)]
        if len(matches) == 1:
            named.append(matches[0])
    return named


def main_parser_refusal(tokens) -> str | None:
    """What main.py's parser says against these flags (its own one-line error, not printed), or None."""
    refusal = io.StringIO()
    try:
        with contextlib.redirect_stderr(refusal), contextlib.redirect_stdout(refusal):  # an error, or --help
            main.parse_args(tokens)
    except SystemExit as exit_:  # main's parser refused them (code 2), or printed its --help (code 0)
        lines = refusal.getvalue().strip().splitlines()
        return lines[-1].split("error: ", 1)[-1] if exit_.code and lines else "not flags for a training row"
    return None


def check_row_flags(parser, option, flags) -> list:
    """The main.py flags of a --model-flags or --fast-flags string, as tokens; one line, before any work, for
    a flag it may not hold (NOT_ROW_FLAGS; a model flag in --fast-flags, any other flag in --model-flags) or one
    main.py's parser refuses."""
    where, model = f"{option} {flags!r}", model_options()
    try:
        tokens = shlex.split(flags)
    except ValueError as error:  # "No closing quotation"
        parser.error(f"{where}: {error}: quote the flags as a shell would")
    for name in options_named(tokens):
        if name in NOT_ROW_FLAGS:
            parser.error(f"{where}: {NOT_ROW_FLAGS[name]}")
        if option == "--fast-flags" and name in model:
            parser.error(f"{where}: {name} changes the model, which all rows share: pass it in --model-flags")
        if option == "--model-flags" and name not in model:
            parser.error(f"{where}: {name} is not a model flag ({', '.join(model)}): pass it in --fast-flags")
    refusal = main_parser_refusal(tokens)
    if refusal:
        parser.error(f"{where}: {refusal}")
    return tokens


def describe_model(model_tokens, num_classes) -> dict:
    """Flags, parameter count and forward FLOPs of the model every row trains (the attention path changes none)."""
    config = model_config_from_args(main.parse_args(model_tokens), num_classes, attention="math")
    return {"model_flags": " ".join(model_tokens) or "(defaults)",
            "parameters": count_parameters(VisionTransformer(config)),
            "forward_gflop_per_image": forward_flops_per_image(config) / 1e9}


ROW_OPTIONS = ("--fast-flags", "--model-flags")


def row_flags_joined(argv: list) -> list:
    """`--fast-flags --no-compile` (or `--fast --no-compile`) read as `--fast-flags=--no-compile`: argparse takes a
    lone value starting with a dash for an option and refuses it ("expected one argument")."""
    joined = []
    for token in argv:
        row_option = joined and len(joined[-1]) > 2 and any(option.startswith(joined[-1]) for option in ROW_OPTIONS)
        if row_option and token.startswith("-") and token != "--":
            joined[-1] = f"{joined[-1]}={token}"
        else:
            joined.append(token)
    return joined


def build_parser() -> OneLineErrors:
    p = OneLineErrors(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--data-dir", type=nonempty_path, help="a folder holding cifar-10-batches-py/ (default: ./data if it holds one, "
                                      "else random images)")
    p.add_argument("--batch-size", type=main.positive_int, default=128)
    p.add_argument("--steps", type=main.positive_int, default=None,
                   help="timed training steps per config (default: 8 on the CPU, 300 on CUDA, fewer if the data "
                        "holds fewer batches)")
    p.add_argument("--warmup", type=main.positive_int, default=None, help="untimed steps first, at most --steps (default 2 / 30)")
    p.add_argument("--eval-images", type=main.positive_int, default=None, help="default 1,000 on the CPU, 10,000 on CUDA (at most the test set)")
    p.add_argument("--augment-images", type=main.positive_int, default=None, help="default 5,000 / 50,000 (at most the training set)")
    p.add_argument("--workers", type=main.non_negative_int, default=data.default_workers())
    p.add_argument("--json", default="bench.json", type=nonempty_path, help="results file, a .json (replaced)")
    p.add_argument("--model-flags", default="", metavar="FLAGS",
                   help=f"main.py model flags for every row, e.g. \"--layers 2 --hidden 64 --mlp-hidden 64 --heads 4\" (any of "
                        f"{', '.join(model_options())}; default: the recipe's model)")
    p.add_argument("--fast-flags", action="append",
                   help="main.py flags for a fast row, e.g. \"--compile-mode reduce-overhead\" or --no-compile; repeat "
                        "for several rows (default: one row, the defaults)")
    p.add_argument("--profile-steps", type=main.non_negative_int, default=0,
                   help="after timing, profile this many steps of each row (torch.profiler; 0: off)")
    return p


def parse_options(p, argv):
    """The options, checked before any work (the rows' flags split into tokens), the fast rows' tokens and the
    device."""
    opts, unknown = p.parse_known_args(row_flags_joined(sys.argv[1:] if argv is None else argv))
    if unknown:  # a word that is no flag: most likely the second word of an unquoted `--fast-flags --precision fp32`
        hint = ("" if all(token.startswith("-") for token in unknown) else
                " (a row's flags go in one quoted string, e.g. --fast-flags \"--precision fp32\")")
        p.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    if not opts.json.endswith(".json"):  # it is replaced: never a checkpoint or a log given by mistake
        p.error(f"--json {opts.json} is not a .json file name: give one, e.g. bench.json")
    try:  # written at the end: a path that cannot take it is refused before the work
        existed = os.path.exists(opts.json)
        with open(opts.json, "a"):
            pass
        if not existed:
            os.remove(opts.json)
    except OSError as error:
        p.error(f"--json {opts.json}: cannot write it ({error.strerror or error}): choose another path")
    if opts.data_dir and not holds_cifar10(opts.data_dir):
        p.error(f"--data-dir {opts.data_dir} holds no {data.FOLDERS['cifar10']}/: fix the path, or leave --data-dir "
                f"out to time random images")
    opts.model_tokens = check_row_flags(p, "--model-flags", opts.model_flags)
    fast_rows = [check_row_flags(p, "--fast-flags", flags) for flags in opts.fast_flags or [""]]
    from trainer import TrainingStopped, resolve_device
    try:
        device = resolve_device(opts.device)
    except TrainingStopped as error:
        p.error(str(error))
    opts.device = device.type
    return opts, fast_rows, device


def fit_to_data(p, opts, cifar):
    """The defaults fitted to the data (a small copy holds fewer images); a request it cannot meet is refused."""
    on_cuda = opts.device == "cuda"
    train_held, test_held = len(cifar.train_images), len(cifar.test_images)
    opts.steps = opts.steps or max(1, min(300 if on_cuda else 8, train_held // opts.batch_size))
    opts.warmup = opts.warmup or min(30 if on_cuda else 2, opts.steps)
    opts.eval_images = opts.eval_images or min(10_000 if on_cuda else 1_000, test_held)
    opts.augment_images = opts.augment_images or min(50_000 if on_cuda else 5_000, train_held)
    for flag, wanted, held in (("--steps x --batch-size", opts.steps * opts.batch_size, train_held),
                               ("--augment-images", opts.augment_images, train_held),
                               ("--eval-images", opts.eval_images, test_held)):
        if wanted > held:
            p.error(f"{flag} asks for {wanted:,} images but the data holds {held:,}: ask for fewer")
    if opts.profile_steps > opts.steps:
        p.error(f"--profile-steps {opts.profile_steps} is more than --steps {opts.steps}: the profile runs on the "
                f"timed steps' batches, so it can be at most as many")
    if opts.warmup > opts.steps:
        p.error(f"--warmup {opts.warmup} is more than --steps {opts.steps}: the warm-up runs on the timed steps' "
                f"batches, so it can be at most as many")


def main_cli(argv=None):
    p = build_parser()
    opts, fast_rows, device = parse_options(p, argv)
    try:
        cifar, source = load_data(opts.data_dir or "./data")
    except data.DataError as error:
        p.error(f"{error} (bench.py never downloads: fix or remove the folder, or let main.py download it)")
    fit_to_data(p, opts, cifar)
    model = describe_model(opts.model_tokens, cifar.num_classes)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    header = (f"bench: {machine} | torch {torch.__version__} | {source} | model {model['model_flags']}: "
              f"{model['parameters']:,} parameters, {model['forward_gflop_per_image']:.3g} GFLOP forward per image | "
              f"batch {opts.batch_size} | {opts.steps} timed steps after {opts.warmup} | "
              f"{opts.workers} DataLoader workers")
    print(header, flush=True)
    results = []
    configs = [("reference", REFERENCE_FLAGS)]
    configs += [("fast" if i == 0 else f"fast-{i + 1}", tokens) for i, tokens in enumerate(fast_rows)]
    for name, flags in configs:
        results.append(bench_row(name, flags, cifar, opts))
        print(json.dumps(results[-1]), flush=True)
    augmentation = bench_augmentation(cifar, opts, device)
    print_table(results, augmentation, header)
    with open(opts.json, "w") as f:
        json.dump({"header": header, **model, "training": results, "augmentation": augmentation}, f, indent=2)


if __name__ == "__main__":
    run_script(main_cli)
