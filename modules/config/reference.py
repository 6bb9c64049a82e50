"""docs/configuration.md, written from the key table (config.keys), so that the reference of every key cannot drift
from what the code reads:

    python -m modules.config.reference > docs/configuration.md
"""
from modules.config.keys import KEYS, REQUIRED

CONDITIONER_FROM = "input_type"  # the table's keys from this one on set the latent conditioner

HEADER = """\
# Configuration: `input_data/condition.txt` and `preset.txt`

Generated from `modules/config/keys.py` by `python -m modules.config.reference > docs/configuration.md`; a test fails
when it drifts from the key table.

## `input_data/condition.txt`

One `key value` per line (`key: value` works too); `#` starts a comment; lines starting with `%` or `'` are skipped;
numbers may be written `1e6` or `1000000`. An unknown key is warned about with the nearest known key; the original
SimulGenVAE's keys that have nothing to set here (`RESERVED`, `Stretch`, `num_aug_f`, `num_aug_a`, `rec_graph`,
`n_sample`) get one quiet line for all of them; a key that cannot act in the chosen setup is reported with the
reason. A missing required key, a bad value or inconsistent settings stop the run with one line naming the file, the
line and the fix, and exit code 2.

Below, *flag* means the key can also be given on the command line (`--size=large`), where it wins over the file;
*resumable* means a resumed run (`--resume`) may change it (every other key shapes the model or its training, so a
checkpoint is resumed only with the config that wrote it).
"""

PRESET = """\
## `preset.txt`

Line 1 is a header. Then presets of 4 lines each (blank lines are skipped); `--preset=K` picks the K-th block:

```
data_No, init_beta_divisor, encoder_filters, conditioner_filters
1                      <- data_No: reads input_data/dataset1.*
0                      <- init_beta_divisor d: the KL weight starts at 1e-4 * 10^-d
64 64 32               <- encoder filters: one convolution level (and one latent) per number, finest first
32 64 128 256          <- conditioner filters: the MLP's block widths, or the CNN's stage channels
```

The KL weight is `1e-4 * 10^-d` for the first `beta_hold_fraction` of the epochs, rises along a half cosine to 1 by
`beta_ramp_end_fraction`, then stays at 1. It and the learning rate move at every optimiser step (at the step's
position in the run, in epochs), not once an epoch.
"""


def reference_markdown() -> str:
    """The whole of docs/configuration.md."""
    split = next(index for index, key in enumerate(KEYS) if key.name == CONDITIONER_FROM)
    sections = [HEADER,
                key_table("### The data, the VAE and the run", KEYS[:split]),
                key_table("### The latent conditioner (what defines a design, and the network that reads it)",
                          KEYS[split:]),
                PRESET]
    return "\n".join(sections)


def key_table(title: str, keys) -> str:
    lines = [title, "", "| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{key.name}` | {default_text(key)} | {meaning(key)} |" for key in keys]
    return "\n".join(lines) + "\n"


def default_text(key) -> str:
    if key.default is REQUIRED:
        return "required"
    if key.default is None or key.default == "":
        return "(see meaning)" if key.default is None else ""
    return f"`{key.default}`"


def meaning(key) -> str:
    """The key's help, then what kind of value it takes and how it behaves."""
    parts = [key.help[0].upper() + key.help[1:] + ("" if key.help.endswith(".") else ".")]
    if key.choices:
        parts.append("One of " + ", ".join(f"`{choice}`" for choice in key.choices) + ".")
    if key.only_with is not None:
        parts.append(f"No effect when {key.only_with[1]}.")
    if key.flag:
        parts.append(f"Flag: `--{key.field}`.")
    if key.resumable:
        parts.append("Resumable.")
    return " ".join(parts).replace("|", "\\|")


if __name__ == "__main__":
    print(reference_markdown(), end="")
