"""Every condition.txt key, declared once: its name in the file, the Config field it fills, its type, default, check
and one-line description (docs/configuration.md is generated from it; a test keeps them in step), and how it behaves:

- flag: help text of the command-line flag of the same name (empty: no flag); a flag given overrides the file.
  launched: launch_ddp.py passes the flag on to every process (not device: each process picks its own GPU).
- resumable: a resumed run may change it (where and how fast it runs, how it logs and reacts to trouble); every other
  setting shapes the model or its training, so a checkpoint is resumed only with the config that wrote it.
- data: it says which data a model was trained on (a saved VAE is refused for data that differs).
- only_with: (condition on the Config, why not): given while the condition is false, the key is reported as having
  no effect, never silently ignored.
- canonical: the one spelling a value is stored in (alpha 1e6 and 1000000 are one setting, for --resume too).
- earlier: what a saved config written before the key existed meant by leaving it out, when not the default.
"""
import re
from dataclasses import dataclass

REQUIRED = object()  # default marker for keys the user must give
MAX_FIELD_PLOT_ROWS = 24  # rows of field maps in one plot (designs x steps x variables): 3.3 inches each
DEFAULT_PLOT_DESIGNS = 2  # the evaluation plots' designs without plot_designs: the median and the largest error
LOSS_NAMES = {1: "MSE", 2: "MAE", 3: "SmoothL1", 4: "Huber"}  # Loss_type's numbers
# input_type -> what param_dir holds (models.conditioners.CONDITIONERS maps each to its network)
DESIGN_INPUTS = {"none": None, "csv": "parameters", "image": "images", "image_vit": "images"}


@dataclass(frozen=True)
class Key:
    """One condition.txt key (see the module's docstring)."""

    name: str
    field: str
    kind: type
    default: object
    help: str
    check: object = None  # callable(value) -> error text or None
    choices: tuple = ()
    flag: str = ""
    bare_flag: bool = False  # the flag may be given without a value, meaning 1 (--compile)
    launched: bool = True
    resumable: bool = False
    data: bool = False
    only_with: tuple | None = None
    canonical: object = None  # callable(value) -> value
    earlier: object = None


def _positive(value):
    return None if value > 0 else "must be > 0"


def _non_negative(value):
    return None if value >= 0 else "must be >= 0"


def _auto_or_positive(text: str):
    if text == "auto":
        return None
    try:
        return None if float(text) > 0 else "must be auto or a number > 0"
    except ValueError:
        return "must be auto or a number > 0"


def _auto_or_number(value) -> str:
    """'auto', or the number in one spelling ('1e6', '1000000' and 1e6 -> '1000000.0')."""
    return "auto" if value == "auto" else repr(float(value))


def _fraction(value):
    return None if 0 <= value <= 1 else "must be between 0 and 1"


def whole_numbers(text: str) -> tuple:
    """A list key as written ('3 7 12' or '3, 7, 12'; checked by _whole_numbers) -> (3, 7, 12); '' -> ()."""
    return tuple(int(word) for word in text.replace(",", " ").split())


def _whole_numbers(text: str, what: str, count: int | None = None, positive: bool = False):
    """Check a space-separated list of whole numbers (>= 0, or > 0 when positive); count: exactly that many."""
    words = text.replace(",", " ").split()
    if not all(word.isdigit() for word in words) or (positive and any(int(word) == 0 for word in words)):
        return f"must be {'positive' if positive else 'non-negative'} whole {what} separated by spaces"
    if count is not None and len(words) != count:
        return f"must be {count} whole numbers"
    return None


# Conditions under which a key can act (only_with)
WITH_CONDITIONER = (lambda c: c.input_type != "none", "input_type is none (VAE only)")
WITH_IMAGES = (lambda c: c.input_type in ("image", "image_vit"), "input_type is not an image type")
WITH_CNN = (lambda c: c.input_type == "image", "input_type is not image (CNN)")
WITH_VIT = (lambda c: c.input_type == "image_vit", "input_type is not image_vit")
WITH_END_TO_END = (lambda c: c.use_e2e_training == 1, "use_e2e_training is 0")
WITH_LATENT_REGULARIZATION = (lambda c: c.use_e2e_training == 1 and c.use_latent_regularization == 1,
                              "use_e2e_training or use_latent_regularization is 0")
WITH_PLOTS = (lambda c: c.plot < 2, "plot is 2 (no plots)")
WITH_PARAMETERS = (lambda c: c.input_type == "csv", "input_type is not csv")
WITH_GRID = (lambda c: bool(c.grid_shape), "grid_shape is not given")
WITH_PARAMETERS_ON_GRID = (lambda c: c.input_type == "csv" and bool(c.grid_shape),
                           "input_type is not csv or grid_shape is not given")
WITH_FEWER_STEPS = (lambda c: c.n_steps_used < c.n_steps, "Dim2_red is not below Dim2 (every step is kept)")

KEYS = (
    Key("Dim1", "n_designs", int, REQUIRED, "number of designs N in the dataset", _positive, data=True),
    Key("Dim2", "n_steps", int, REQUIRED, "number of time steps T in the dataset", _positive, data=True),
    Key("Dim3", "n_nodes", int, REQUIRED, "number of mesh nodes M in the dataset", _positive, data=True),
    Key("Dim2_red", "n_steps_used", int, None, "time steps kept: the first Dim2_red, as in the original SimulGenVAE "
        "(Dim2_spacing even: spread evenly over T) (default: all T)", _positive, data=True),
    Key("Dim2_spacing", "steps_spacing", str, "first", "which Dim2_red steps are kept: first (steps 0 to Dim2_red-1) "
        "or even (spread evenly over T, the first and last included)", choices=("first", "even"), data=True,
        only_with=WITH_FEWER_STEPS, earlier="even"),
    Key("Dim3_start", "node_start", int, 0, "first node kept (crop start, 0-based)", _non_negative, data=True),
    Key("Dim3_end", "node_end", int, None, "one past the last node kept (default: M)", _positive, data=True),
    Key("num_var", "n_vars", int, 1, "variables stored side by side along the node axis, each scaled on its own",
        _positive, data=True),
    Key("Training_epochs", "epochs", int, REQUIRED, "VAE training epochs", _positive),
    Key("Batch_size", "batch_size", int, 16, "designs per training batch", _positive),
    Key("LearningR", "lr", float, 1e-3, "peak learning rate of AdamW", _positive),
    Key("Latent_dim", "level_latent_dim", int, 8, "latent size of each hierarchical level", _positive),
    Key("Latent_dim_end", "main_latent_dim", int, 32, "size of the main latent", _positive),
    Key("Loss_type", "loss_type", int, 1, "reconstruction loss: 1 MSE, 2 MAE, 3 SmoothL1, 4 Huber",
        choices=tuple(LOSS_NAMES)),
    Key("alpha", "recon_weight", str, "auto", "the reconstruction term: auto (a Gaussian likelihood, Laplace for "
        "Loss_type 2, whose noise scale per variable is set after each epoch to the validation designs' error) or a "
        "number (a fixed weight on the mean loss, as in the original SimulGenVAE)", _auto_or_positive,
        canonical=_auto_or_number),
    Key("Recon_iter", "recon_samples", int, 1, "posterior samples averaged in the reconstruction term", _positive),
    Key("huber_delta", "huber_delta", float, 0.1, "threshold of SmoothL1/Huber, in scaled units", _positive),
    Key("seed", "seed", int, 42, "seeds Python, NumPy, torch and the train/validation split", _non_negative),
    Key("val_fraction", "val_fraction", float, 0.2, "share of designs held out for validation",
        lambda v: None if 0 < v < 1 else "must be between 0 and 1 (exclusive)"),
    Key("beta_hold_fraction", "beta_hold_fraction", float, 0.3,
        "share of epochs the KL weight stays at its start value", _fraction),
    Key("beta_ramp_end_fraction", "beta_ramp_end_fraction", float, 0.8,
        "share of epochs by which the KL weight has risen to 1", _fraction),
    Key("warmup_fraction", "warmup_fraction", float, 0.05, "share of epochs of linear learning-rate warmup",
        lambda v: None if 0 <= v < 1 else "must be >= 0 and < 1"),
    Key("lr_cycles", "lr_cycles", int, 1, "cosine warm-restart cycles after warmup", _positive),
    Key("lr_min", "lr_min", float, 1e-6, "learning rate at the bottom of each cosine cycle", _non_negative),
    Key("weight_decay", "weight_decay", float, 1e-4, "AdamW weight decay", _non_negative),
    Key("grad_clip", "grad_clip", float, 5.0, "gradient-norm clipping threshold (0 turns clipping off)",
        _non_negative),
    Key("free_bits", "free_bits", float, 0.0, "KL floor per latent dimension in nats: a dimension whose batch-mean "
        "KL is below it adds free_bits to the loss instead, so the KL term stops pushing it towards collapse",
        _non_negative),
    Key("patience", "patience", int, 0,
        "stop the VAE after this many epochs without a better validation reconstruction (0: never)", _non_negative,
        resumable=True),
    Key("start_patience", "start_patience", int, "auto",
        "stop the VAE after this many epochs when none has reconstructed the validation designs better than its "
        "starting state (with pod_path 1, POD's reconstruction), which is then kept; auto: a quarter of "
        "Training_epochs, at least 10; 0: never", _non_negative, resumable=True, earlier=0),
    Key("save_every", "save_every", int, 10,
        "write checkpoints/last.pt, the full training state, every this many epochs", _positive, resumable=True),
    Key("max_skipped_steps", "max_skipped_steps", int, 20, "optimiser steps in a row with a non-finite loss or "
        "gradient that are skipped before the run restores its last checkpoint", _positive, resumable=True),
    Key("divergence_factor", "divergence_factor", float, 10.0, "a validation loss above this many times the best "
        "so far (or not finite) restores the last checkpoint", lambda v: None if v > 1 else "must be > 1",
        resumable=True),
    Key("recovery_lr_factor", "recovery_lr_factor", float, 0.5,
        "each restore of the last checkpoint multiplies the learning rate by this",
        lambda v: None if 0 < v < 1 else "must be between 0 and 1 (exclusive)", resumable=True),
    Key("max_recoveries", "max_recoveries", int, 3,
        "restores of the last checkpoint a run may make before it stops with an error", _non_negative, resumable=True),
    Key("deterministic", "deterministic", int, 0, "1: torch's deterministic algorithms (ops that have none warn)",
        choices=(0, 1), resumable=True),
    Key("projection_rank", "projection_rank", int, 128,
        "width of the POD-initialised node projection (first and last layers)", _positive),
    Key("pod_path", "pod_path", int, 1, "1: every latent number is also a whitened design-POD coefficient of a "
        "frozen linear path, and the network learns a residual on top of it (reconstruction starts as good as POD "
        "with as many modes); 0: the network alone", choices=(0, 1), earlier=0),
    Key("field_codec_epochs", "field_codec_epochs", int, 40, "where the nodes' positions are known (grid_shape, "
        "mesh_file or node_coordinates): passes over the training designs' time steps of a snapshot codec (each time "
        "step to 4, 8 or 16 numbers that shift, stretch and reweight a sine network over the node coordinates, or to 8 "
        "that shift it, whichever fits best a quarter of the way: features can move and change shape), trained "
        "before the VAE; the VAE then runs on those codes when they reconstruct the validation designs from its "
        "latent size better than POD does, on the fields otherwise (said either way); 0: not tried",
        _non_negative, earlier=0),
    Key("augment_noise_std", "augment_noise_std", float, 0.0, "Gaussian noise added to training inputs (scaled units)",
        _non_negative),
    Key("augment_amplitude", "augment_amplitude", float, 0.0,
        "training inputs scaled by a random factor in [1-a, 1+a]", _fraction),
    Key("augment_mixup_prob", "augment_mixup_prob", float, 0.0,
        "probability that a training design is mixed with another training design of its batch", _fraction),
    Key("num_workers", "num_workers", str, "auto", "threads that read streamed batches ahead of the training step "
        "(load_all 0): auto or a count, 0: read when needed (DataLoader worker processes before 2026-12; the same "
        "batches)", lambda v: None if v == "auto" or v.isdigit() else "must be auto or a whole number >= 0",
        resumable=True),
    Key("hdf5_dataset", "hdf5_dataset", str, "", "dataset name inside an HDF5 file (default: its only dataset)"),
    Key("data_storage", "data_storage", str, "float32", "the file a run reads: float32, the dataset itself; float16 or "
        "bfloat16, the half-size copy input_data/dataset{data_No}.float16.npy (.bfloat16.npy) that --store_half "
        "writes (half the bytes to read, widened to float32 as read)", choices=("float32", "float16", "bfloat16"),
        flag="float32 (default), or float16 / bfloat16: train on the half-size copy of the dataset that "
             "--store_half wrote"),
    Key("log_every", "log_every", int, 0, "print a summary line every this many epochs (0: about 20 lines a run)",
        _non_negative, resumable=True),
    Key("size", "size", str, "small", "model size: small (1 block per level) or large (2 blocks, wider heads)",
        choices=("small", "large"),
        flag="model depth/width: small = 1 residual block per level, large = 2 and wider latent heads (default small)"),
    Key("load_all", "load_all", int, 0, "1: preload the scaled data on the device; 0: stream from the file",
        choices=(0, 1),
        flag="1: preload the scaled data on the training device; 0: stream batches from the memory-mapped file, "
             "for data larger than RAM (default 0)", resumable=True),
    Key("plot", "plot", int, 2, "0: save PNG plots and show them; 1: save PNGs; 2: no plots", choices=(0, 1, 2),
        flag="0: save PNG plots and show them at the end (only with a screen and a terminal); 1: save PNGs in "
             "output/; 2: no plots (default 2)", resumable=True),
    Key("plot_designs", "plot_designs", str, "", "designs (0-based indices) whose fields the plots show (default: "
        "the validation designs with the median and the largest error)", lambda v: _whole_numbers(v, "indices"),
        resumable=True, only_with=WITH_PLOTS),
    Key("plot_steps", "plot_steps", str, "", "time steps (0-based, of the steps kept) the field plots show "
        "(default: a quarter, half way and the last)", lambda v: _whole_numbers(v, "time steps"),
        resumable=True, only_with=WITH_PLOTS),
    Key("plot_color_by", "plot_color_by", str, "", "parameter (CSV column name or 1-based number) that colours the "
        "latent-space plots (default: the first parameter; without a CSV, each design's reconstruction error)",
        resumable=True, only_with=WITH_PLOTS),
    Key("grid_shape", "grid_shape", str, "", "H W: each variable's nodes form an H x W grid (row-major), so fields "
        "are drawn as maps and .xdmf outputs are quads", lambda v: _whole_numbers(v, "grid sizes", count=2,
                                                                                   positive=True), resumable=True),
    Key("grid_periodic", "grid_periodic", int, 0, "1: the grid (grid_shape) wraps around at its edges, a periodic "
        "domain: the feature-frame GP measures where a feature is across an edge", choices=(0, 1), resumable=True,
        only_with=WITH_GRID),
    Key("mesh_file", "mesh_file", str, "", "a mesh meshio reads (.vtu, .vtk, .msh, .inp, .xdmf, ...) whose points are "
        "the nodes of one variable, in node order: the plots draw fields on its cells, .xdmf and .h5 outputs carry "
        "it", resumable=True),
    Key("node_coordinates", "node_coordinates", str, "", ".npy or .csv of x, y (2 or 3 columns) per node of one "
        "variable, in node order (a point cloud), so fields are drawn as maps and outputs carry the points",
        resumable=True),
    Key("time_values", "time_values", str, "", ".npy or .csv of the time value of each of the Dim2 steps (--import "
        "writes it from the solver's files): .pvd and .xdmf outputs carry these times instead of the step numbers",
        resumable=True),
    Key("device", "device", str, "auto", "auto, cpu, cuda or cuda:N",
        lambda v: None if re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) else "must be auto, cpu, cuda or cuda:N",
        flag="auto (this process's GPU if there is one, else CPU), cpu, cuda or cuda:N (default auto)", launched=False,
        resumable=True),
    Key("amp", "amp", str, "auto", "mixed precision: auto (bf16 on GPUs that have it, else fp16; float32 on the CPU), "
        "bf16, fp16 or off", choices=("auto", "bf16", "fp16", "off"),
        flag="mixed precision: auto = bf16 on a GPU that supports it, fp16 with loss scaling on older GPUs, "
             "float32 on the CPU; bf16 or fp16 force it; off = float32 (default auto)", resumable=True),
    Key("grad_checkpointing", "grad_checkpointing", int, 0,
        "1: recompute each level's activations in the backward pass instead of keeping them", choices=(0, 1),
        flag="recompute the activations of each level (and of the conditioner's blocks) in the backward pass "
             "instead of keeping them: less memory, about one more forward pass (default 0)", bare_flag=True,
        resumable=True),
    Key("compile", "compile", int, 0, "1: train through torch.compile of the model", choices=(0, 1),
        flag="train through torch.compile of the model (the first steps compile; default 0)", bare_flag=True,
        resumable=True),
    Key("grad_accum_steps", "grad_accum_steps", int, 1,
        "batches whose gradients are summed before each optimiser step", _positive,
        flag="sum the gradients of K batches before each optimiser step: the effective batch is K x Batch_size "
             "designs (default 1)"),
    # ---- latent conditioner: maps what defines a design (CSV row or geometry image) to its latents
    Key("input_type", "input_type", str, "none",
        "what defines a design: none (train the VAE only), csv (parameters, MLP), image (CNN) or image_vit (ViT)",
        choices=tuple(DESIGN_INPUTS)),
    Key("param_dir", "param_dir", str, "",
        "the parameter CSV (input_type csv) or the image folder (image, image_vit), relative to the case folder",
        only_with=WITH_CONDITIONER),
    Key("param_data_type", "param_data_type", str, "", "file type of param_dir: .csv, .png or .jpg "
        "(default: .csv for csv, .png for images)",
        lambda v: None if v.lower().lstrip(".") in ("csv", "png", "jpg", "jpeg") else "must be .csv, .png or .jpg",
        only_with=WITH_CONDITIONER),
    Key("num_param", "num_param", int, 0, "columns of the parameter CSV, checked when given (0: take the file's)",
        _non_negative, only_with=WITH_CONDITIONER),
    Key("image_size", "image_size", int, "auto", "images are resized to image_size x image_size pixels; auto: the "
        "images' own size when all are square and alike, else 256 (the original SimulGenVAE's)", _positive,
        only_with=WITH_IMAGES),
    Key("n_epoch", "lc_epochs", int, 500, "latent-conditioner training epochs", _positive, only_with=WITH_CONDITIONER),
    Key("latent_conditioner_lr", "lc_lr", float, 1e-3, "peak learning rate of the conditioner's AdamW", _positive,
        only_with=WITH_CONDITIONER),
    Key("latent_conditioner_batch", "lc_batch_size", int, 16, "designs per conditioner batch", _positive,
        only_with=WITH_CONDITIONER),
    Key("latent_conditioner_dropout_rate", "lc_dropout", float, 0.1,
        "conditioner dropout (the MLP's deepest block; shallower blocks drop less)",
        lambda v: None if 0 <= v < 1 else "must be >= 0 and < 1", only_with=WITH_CONDITIONER),
    Key("latent_conditioner_weight_decay", "lc_weight_decay", float, 1e-4, "conditioner AdamW weight decay",
        _non_negative, only_with=WITH_CONDITIONER),
    # 50: twice the longest wait between two better epochs on the benchmark's cases (docs/model.md)
    Key("lc_patience", "lc_patience", int, 50,
        "stop the conditioner after this many epochs without a better validation loss (0: never)", _non_negative,
        resumable=True, only_with=WITH_CONDITIONER),
    Key("lc_ensemble", "lc_ensemble", int, 1, "networks trained side by side as one conditioner, each from its own "
        "random start: the prediction is their mean, their disagreement its uncertainty (--samples); 1: one network",
        _positive, only_with=WITH_CONDITIONER),
    Key("latent_gp", "latent_gp", int, 1, "1: also fit a Gaussian-process regressor from the parameters (on "
        "images: from the neural field's embedding of them) to the latents (one GP per latent number) and keep it "
        "instead of the others when it predicts the validation designs' fields better; 0: not tried", choices=(0, 1),
        resumable=True, only_with=WITH_CONDITIONER),
    Key("latent_rbf", "latent_rbf", int, 1, "1: also fit a thin-plate-spline interpolant from the parameters (on "
        "images: from the neural field's embedding of them) to the latents (POD + RBF while the VAE is at its POD "
        "start) and keep it instead of the others when it predicts the validation designs' fields better; 0: not "
        "tried", choices=(0, 1), resumable=True, only_with=WITH_CONDITIONER, earlier=0),
    Key("feature_frame_gp", "feature_frame_gp", int, 1, "1: where the designs are parameters and the nodes a grid "
        "(grid_shape), also fit a GP per number of each time step's feature frame (the centroid and spread of the "
        "field) and of the field drawn in that frame, and keep it instead of the others when it predicts the "
        "validation designs' fields better (features that move, turn and stretch); 0: not tried", choices=(0, 1),
        resumable=True, only_with=WITH_PARAMETERS_ON_GRID, earlier=0),
    Key("field_conditioner_epochs", "field_conditioner_epochs", int, 60, "where the nodes' positions are known "
        "(grid_shape, mesh_file or node_coordinates): passes over the training designs' time steps of a neural-field "
        "conditioner (parameters, or an image through an encoder trained with it, and time -> a code that shifts a "
        "sine network over the node coordinates: features can move across the mesh), kept instead of the others when "
        "it predicts the validation designs' fields better; 0: not tried", _non_negative, resumable=True,
        only_with=WITH_CONDITIONER),
    Key("use_spatial_attention", "use_spatial_attention", int, 0, "1: spatial attention in the CNN's stages",
        choices=(0, 1), only_with=WITH_CNN),
    Key("lc_augment_flip", "lc_augment_flip", int, 0,
        "1: random horizontal/vertical flips of training images (only if your geometry is symmetric)", choices=(0, 1),
        only_with=WITH_IMAGES),
    Key("lc_augment_shift", "lc_augment_shift", int, 0, "random shifts of training images by up to this many pixels",
        _non_negative, only_with=WITH_IMAGES),
    Key("vit_patch_size", "vit_patch_size", int, 16, "ViT patch size in pixels (must divide image_size)", _positive,
        only_with=WITH_VIT),
    Key("vit_dim", "vit_dim", int, 256, "ViT token width", _positive, only_with=WITH_VIT),
    Key("vit_depth", "vit_depth", int, 6, "ViT transformer blocks", _positive, only_with=WITH_VIT),
    Key("vit_heads", "vit_heads", int, 8, "ViT attention heads (must divide vit_dim)", _positive, only_with=WITH_VIT),
    Key("vit_drop_path", "vit_drop_path", float, 0.1, "ViT stochastic depth rate of the last block",
        lambda v: None if 0 <= v < 1 else "must be >= 0 and < 1", only_with=WITH_VIT),
    Key("use_e2e_training", "use_e2e_training", int, 0,
        "1: train the conditioner through the frozen VAE decoder on the field reconstruction loss", choices=(0, 1),
        only_with=WITH_CONDITIONER),
    Key("e2e_loss_function", "e2e_loss_function", str, "MSE", "field loss of end-to-end training",
        choices=("MSE", "MAE", "Huber", "SmoothL1"), only_with=WITH_END_TO_END),
    Key("use_latent_regularization", "use_latent_regularization", int, 0,
        "1: end-to-end training also pulls the predicted latents towards the VAE's latents", choices=(0, 1),
        only_with=WITH_END_TO_END),
    Key("latent_reg_weight", "latent_reg_weight", float, 1e-3, "weight of that latent term", _non_negative,
        only_with=WITH_LATENT_REGULARIZATION),
    Key("e2e_vae_model_path", "e2e_vae_model_path", str, "",
        "VAE that --lc_only=1 end-to-end training decodes through (default: model_save/SimulGen-VAE)",
        only_with=WITH_END_TO_END),
)
KEYS_BY_NAME = {key.name.lower(): key for key in KEYS}
KEYS_BY_FIELD = {key.field: key for key in KEYS}
FLAG_KEYS = tuple(key for key in KEYS if key.flag)  # condition.txt keys that are also command-line flags


def add_key_flags(parser, keys=FLAG_KEYS) -> None:
    """A command-line flag --<field> per key, typed and checked like the key (default None: not given)."""
    for key in keys:
        options = {"help": key.flag, "default": None}
        if key.kind is not str:
            options["type"] = key.kind
        if key.choices:
            options["choices"] = key.choices
        elif key.kind is int:
            options["metavar"] = "K"
        if key.bare_flag:
            options.update(nargs="?", const=1)
        parser.add_argument(f"--{key.field}", **options)
