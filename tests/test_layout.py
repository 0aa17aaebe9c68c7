"""The architecture, asserted from the source (ast; nothing is imported):

1. every module of sadm_finetune/ has a test file that names it (COVERAGE maps each test file to the modules it
   covers: the file must import each, name its dotted path, or be its mirror `tests/<subpackage>/test_<module>.py`);
   every test file is in the map and test basenames are unique (pytest's default import mode needs it);
2. subpackages import only downwards (LAYERS, measured with `import_graph` and then decided), the exceptions named
   one by one with the reason in UPWARD_IMPORTS;
3. no import cycle among modules at import time, and none through function-level imports except LAZY_CYCLES.

The checkers take the package and tests folders as arguments, so the last tests run them on a throwaway package:
they must report a module without a test, an upward import and a cycle (the checks cannot pass vacuously).
An exception or cycle listed here that the code no longer has fails too: delete its entry."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sadm_finetune"
TESTS = ROOT / "tests"

# test file (relative to tests/) -> the modules it covers (dotted, relative to sadm_finetune; "" is the package)
COVERAGE: dict[str, list[str]] = {
    # cross-cutting and end to end
    "test_bad_input.py": ["cli", "utils.errors", "train.output_dir"],
    "test_cpu_wait.py": ["cpu_wait"],
    "test_demo_base.py": [""],
    "test_demo_recipe.py": [],
    "test_recipes.py": [],
    "test_hub_server.py": [],
    "test_layout.py": [],
    "test_docs_links.py": [],
    "benchmarks/test_gpu_check.py": [],  # benchmarks/ scripts, outside the package
    "benchmarks/test_harness.py": [],
    "benchmarks/test_study_arms.py": [],
    "benchmarks/test_fid_floor.py": [],
    "benchmarks/test_study_logs.py": [],
    "benchmarks/test_offset_dose.py": [],
    "benchmarks/test_pair_reports.py": [],
    "benchmarks/test_step_time.py": [],
    # config/
    "config/test_config.py": ["config.run", "cli"],
    "config/test_flags.py": ["config.flags", "config.fields"],
    # data/
    "data/test_datasets.py": ["data.datasets"],
    "data/test_folder.py": ["data.folder"],
    "data/test_buckets.py": ["data.buckets"],
    "data/test_latent_cache.py": ["data.latent_cache"],
    "data/test_loader.py": ["data.loader"],
    "data/test_text_cache.py": ["data.text_cache"],
    "data/test_personalization.py": ["data.prior", "data.digits"],
    "data/test_prior_config.py": ["data.prior_config"],
    # diffusion/
    "diffusion/test_losses.py": ["diffusion.losses"],
    "diffusion/test_process.py": ["diffusion.process"],
    # families/
    "families/test_dit.py": ["families.dit", "families.loading"],
    "families/test_sd.py": ["families.sd"],
    "families/test_sdxl.py": ["families.sdxl", "families.vae", "train.validation"],
    "families/test_sd3.py": ["families.sd3", "diffusion.flow_config"],
    "families/test_flux.py": ["families.flux", "diffusion.latents"],
    "families/test_pixart.py": ["families.pixart"],
    "families/test_defaults.py": ["families.defaults"],
    "families/test_hub_cache.py": [],  # families.loading through the CLI, from a Hub cache
    "families/test_model_index.py": ["families.model_index"],
    "families/test_qwen_image.py": ["families.qwen_image"],
    "families/test_family_capabilities.py": ["families.base", "families.text"],
    # tuners/
    "tuners/test_lora.py": ["tuners.lora"],
    "tuners/test_lora_files.py": ["tuners.lora", "train.finish"],
    "tuners/test_difffit.py": ["tuners.difffit"],
    "tuners/test_kohya.py": ["tuners.kohya"],
    "tuners/test_lora_options.py": ["tuners.lora", "train.optimizers"],
    "tuners/test_quantized_base.py": ["tuners.quantization"],
    # terms/
    "terms/test_base.py": ["terms.base"],
    "terms/test_term_config.py": ["terms.repa.config", "terms.sddit.config"],
    "terms/test_term_registry.py": ["terms.registry"],
    "terms/sadm/test_sadm_objective.py": ["terms.sadm.objective", "terms.sadm.relations"],
    "terms/sadm/test_sadm_variants.py": ["terms.sadm.term", "terms.sadm.config", "terms.sadm.feature_space"],
    "terms/sadm/test_discriminator.py": ["terms.sadm.discriminator"],
    "terms/repa/test_repa.py": ["terms.repa.term", "terms.repa.cache", "terms"],
    "terms/sddit/test_sddit.py": ["terms.sddit.term"],
    # train/
    "train/test_loop.py": ["train.loop"],
    "train/test_diagnostics.py": ["train.diagnostics"],
    "train/test_builders.py": ["train.builders"],
    "train/test_entry.py": ["train.entry"],
    "train/test_checkpoint_state.py": ["train.checkpointing"],
    "train/test_resume.py": ["train.checkpointing"],
    "train/test_distributed.py": ["train.distributed"],
    "train/test_fsdp.py": ["train.entry"],
    "train/test_nonfinite.py": ["train.builders"],
    "train/test_core_effects.py": ["train.entry"],
    "train/test_text_encoder_lora.py": ["tuners.lora", "tuners.kohya", "train.builders"],
    "train/test_train_dit.py": [],
    # export/
    "export/test_outputs.py": ["export.outputs"],
    "export/test_model_card.py": ["export.card"],
    # evaluation/
    "evaluation/test_evaluate.py": ["evaluation.evaluate"],
    "evaluation/test_features.py": ["evaluation.features", "evaluation.digits_classifier"],
    "evaluation/test_metrics.py": ["evaluation.metrics"],
    "terms/sadm/test_probe.py": ["terms.sadm.probe"],
    "evaluation/test_grid.py": ["evaluation.grid"],
    "evaluation/test_reference.py": ["evaluation.reference"],
    # utils/
    "utils/test_quiet.py": ["utils.quiet"],
    "utils/test_fsutil.py": ["utils.fsutil"],
}

# Import layers, lowest first: a module may import its own layer and the ones below. An entry names a subpackage
# (all of its modules) or one module placed apart from its subpackage; the longest match wins.
LAYERS: list[tuple[str, ...]] = [
    ("utils", "cpu_wait", ""),
    # the run's configuration, with the sections it is assembled from (each beside the code that reads it) and the
    # family defaults build_config fills in (read from model_index.json, without loading a family)
    # The loss terms' registry and sections (terms/__init__, base, registry, <term>/config) sit here too: the run
    # config is composed from them; a term's implementation (terms.<term>.*) is layer 5. The optimizer factory is a
    # leaf (utils only) whose package check the training section runs.
    ("config", "data.prior_config", "diffusion.flow_config", "families.defaults", "families.model_index",
     "terms", "terms.sadm.config", "terms.repa.config", "terms.sddit.config", "train.optimizers"),
    ("diffusion", "tuners"),
    ("data",),
    ("families",),
    # the collectives (any_rank, all-reduces) live in train/ but are what terms reduce with (SADM's global batch)
    ("terms.sadm", "terms.repa", "terms.sddit", "train.distributed"),
    ("export",),
    ("train",),
    ("evaluation", "cli"),
]

# (importer, imported) -> why this upward import is allowed for now. Each is a function-level import.
UPWARD_IMPORTS: dict[tuple[str, str], str] = {
    ("data.prior", "train.validation"): "class images for prior preservation are sampled like validation grids",
    ("config.run", "tuners.quantization"): "the quantization options' environment check (CUDA for bitsandbytes, the "
                                           "backend installed) lives beside the backends it checks",
    # a term's config section builds and checks its term: the implementation is imported when the term is on
    ("terms.sadm.config", "terms.sadm.term"): "SADMConfig.build makes the term (function-level, SADM on only)",
    ("terms.sadm.config", "terms.sadm.objective"): "SADMConfig.build makes the structure probe's objective",
    ("terms.repa.config", "terms.repa.term"): "RepaConfig.build and check_model (REPA on only)",
    ("terms.repa.config", "terms.repa.cache"): "RepaConfig.cache_companions: the encoder features beside the latents",
    ("terms.sddit.config", "terms.sddit.term"): "SDDiTConfig.build (SD-DiT on only)",
}

# Cycles through function-level imports (sorted module lists) -> why; at import time there must be none.
LAZY_CYCLES: dict[tuple[str, ...], str] = {
    ("config.run", "data.buckets", "data.datasets", "data.folder", "data.latent_cache", "families.defaults",
     "terms", "terms.repa.cache", "terms.repa.config", "terms.sadm.config", "terms.sadm.objective",
     "terms.sadm.term", "terms.sddit.config", "terms.sddit.term", "tuners.quantization"):
        "one component through function-level imports only: build_config asks the family for its defaults (which "
        "read model_index.json through a ModelConfig), and each term's section builds its term when the run starts, "
        "whose implementation reads the run config; at import time the layers hold",
}


# ------------------------------------------------------------------------------------------------------------
def module_names(package: Path) -> dict[str, Path]:
    """Dotted names relative to the package ("" for its __init__) -> file, skipping __init__.py files that hold
    nothing but a docstring (subpackage markers: nothing to test)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
            body = ast.parse(path.read_text()).body
            if all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body):
                continue  # an empty subpackage marker: nothing to test
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module):
    """(node, at import time?) for every import statement, leaving out `if TYPE_CHECKING:` blocks."""
    def walk(nodes, top):
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield node, top
            elif isinstance(node, ast.If) and _is_type_checking(node):
                continue
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from walk(ast.iter_child_nodes(node), False)
            else:
                yield from walk(ast.iter_child_nodes(node), top)
    yield from walk(tree.body, True)


def import_graph(package: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges at import time, all edges) between the package's modules, relative dotted names."""
    name = package.name
    modules = module_names(package)
    everything = set(modules) | {".".join(p.relative_to(package).with_suffix("").parts[:-1])
                                 for p in package.rglob("__init__.py")}

    def owner(dotted: str) -> str | None:  # the module a dotted import path lands in
        while dotted not in everything:
            if "." not in dotted:
                return None
            dotted = dotted.rsplit(".", 1)[0]
        return dotted if dotted in modules else None

    top, every = defaultdict(set), defaultdict(set)
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node, at_import in _imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = mod.split(".") if mod else []
                    base = base if is_pkg else base[:-1]
                    base = base[:len(base) - (node.level - 1)] + ([node.module] if node.module else [])
                    prefix = ".".join([name, *base])
                else:
                    prefix = node.module or ""
                targets = [f"{prefix}.{a.name}" for a in node.names] + [prefix]
            for target in targets:
                if target != name and not target.startswith(name + "."):
                    continue
                dest = owner(target[len(name) + 1:] if target != name else "")
                if dest is not None and dest != mod:
                    every[mod].add(dest)
                    if at_import:
                        top[mod].add(dest)
    return top, every


def layer_of(module: str, layers=LAYERS) -> int:
    best, level = -1, None
    for i, entries in enumerate(layers):
        for entry in entries:
            if (module == entry or module.startswith(entry + ".") or entry == "" and module == "") and len(entry) > best:
                best, level = len(entry), i
    if level is None:
        raise AssertionError(f"sadm_finetune.{module} is in no layer: add it (or its subpackage) to LAYERS")
    return level


def upward_imports(package: Path, layers=LAYERS) -> set[tuple[str, str]]:
    _, every = import_graph(package)
    return {(a, b) for a, targets in every.items() for b in targets if layer_of(b, layers) > layer_of(a, layers)}


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(tuple(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def names_module(test_file: Path, module: str, tests: Path, package_name: str = "sadm_finetune") -> bool:
    """The test file imports the module, names its dotted path in a string, or is its mirror test file."""
    dotted = f"{package_name}.{module}" if module else package_name
    parent, _, stem = dotted.rpartition(".")
    rel = test_file.relative_to(tests)
    mirror_dir = Path(*module.split(".")[:-1]) if module else Path()
    if module and rel.parent == mirror_dir and rel.name == f"test_{module.split('.')[-1]}.py":
        return True
    tree = ast.parse(test_file.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name == dotted or a.name.startswith(dotted + ".")
                                                for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == dotted or (node.module == parent and any(a.name == stem for a in node.names)):
                return True
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and dotted in node.value:
            return True
    return False


def untested_modules(package: Path, tests: Path, coverage: dict[str, list[str]]) -> list[str]:
    covered = {m for mods in coverage.values() for m in mods}
    return sorted(set(module_names(package)) - covered)


def coverage_problems(package: Path, tests: Path, coverage: dict[str, list[str]]) -> list[str]:
    modules = module_names(package)
    problems = []
    for rel, mods in coverage.items():
        path = tests / rel
        if not path.is_file():
            problems.append(f"tests/{rel}: in COVERAGE but not found")
            continue
        for mod in mods:
            if mod not in modules:
                problems.append(f"tests/{rel}: covers {package.name}.{mod}, which does not exist")
            elif not names_module(path, mod, tests, package.name):
                problems.append(f"tests/{rel}: does not import or name {package.name}.{mod}")
    found = {p.relative_to(tests).as_posix() for p in tests.rglob("test_*.py")}
    problems += [f"tests/{rel}: a test file missing from COVERAGE" for rel in sorted(found - set(coverage))]
    return problems


# ------------------------------------------------------------------------------------------------------------
def test_every_module_has_a_test_file_that_names_it():
    missing = untested_modules(PACKAGE, TESTS, COVERAGE)
    assert not missing, f"modules no test file covers (add a test and its COVERAGE entry): {missing}"
    problems = coverage_problems(PACKAGE, TESTS, COVERAGE)
    assert not problems, "\n".join(problems)


def test_test_basenames_are_unique():
    names = defaultdict(list)
    for path in TESTS.rglob("*.py"):
        if path.name != "conftest.py":
            names[path.name].append(str(path.relative_to(TESTS)))
    dupes = {k: v for k, v in names.items() if len(v) > 1}
    assert not dupes, f"pytest's prepend import mode needs unique basenames: {dupes}"
    assert not list(TESTS.rglob("__init__.py")), "test folders are not packages (rootdir-relative basenames)"


def test_subpackages_import_only_downwards():
    upward = upward_imports(PACKAGE)
    new = sorted(upward - set(UPWARD_IMPORTS))
    assert not new, ("upward imports (importer -> imported; see LAYERS): "
                     + ", ".join(f"{a} -> {b} (layer {layer_of(a)} -> {layer_of(b)})" for a, b in new))
    gone = sorted(set(UPWARD_IMPORTS) - upward)
    assert not gone, f"UPWARD_IMPORTS entries the code no longer has (delete them): {gone}"
    top, _ = import_graph(PACKAGE)
    assert not {(a, b) for a, b in UPWARD_IMPORTS if b in top.get(a, ())}, "allowed upward imports must stay lazy"


def test_no_import_cycle():
    top, every = import_graph(PACKAGE)
    assert cycles(top) == [], "import cycles at import time"
    found = cycles(every)
    assert sorted(set(found) - set(LAZY_CYCLES)) == [], f"cycles through function-level imports: {found}"
    assert sorted(set(LAZY_CYCLES) - set(found)) == [], "LAZY_CYCLES entries the code no longer has: delete them"


def test_the_layer_table_matches_the_package():
    """Every module falls in a layer and every LAYERS entry names something that exists."""
    modules = module_names(PACKAGE)
    for module in modules:
        layer_of(module)
    packages = {".".join(p.relative_to(PACKAGE).parts[:-1]) for p in PACKAGE.rglob("__init__.py")}
    stale = [e for entries in LAYERS for e in entries if e not in modules and e not in packages]
    assert not stale, f"LAYERS entries that name nothing: {stale}"


# ------------------------------------------------------------------------------------------------------------
def _toy(tmp_path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path / "pkg"


def test_the_checks_report_an_untested_module_an_upward_import_and_a_cycle(tmp_path):
    package = _toy(tmp_path, {
        "pkg/__init__.py": '"""toy"""\n',
        "pkg/low/__init__.py": '"""marker"""\n',
        "pkg/low/a.py": "from ..high.b import thing\n",  # upward, at import time
        "pkg/high/__init__.py": "",
        "pkg/high/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..low import a\n"
                         "def thing():\n    from . import c\n",
        "pkg/high/c.py": "def f():\n    from .b import thing\n",  # a lazy cycle b <-> c
        "pkg/high/d.py": "X = 1\n",
        "tests/low/test_a.py": "",  # the mirror of low.a
        "tests/test_b.py": "from pkg.high import b\n",
        "tests/test_other.py": "import os\n",
    })
    tests = tmp_path / "tests"
    layers = [("low",), ("high", "")]
    assert set(module_names(package)) == {"low.a", "high.b", "high.c", "high.d"}  # the __init__.py are markers
    coverage = {"low/test_a.py": ["low.a"], "test_b.py": ["high.b"], "test_other.py": ["high.c"]}
    assert untested_modules(package, tests, coverage) == ["high.d"]
    assert coverage_problems(package, tests, coverage) == ["tests/test_other.py: does not import or name pkg.high.c"]
    assert coverage_problems(package, tests, {"low/test_a.py": ["low.gone"]}) == [
        "tests/low/test_a.py: covers pkg.low.gone, which does not exist",
        "tests/test_b.py: a test file missing from COVERAGE", "tests/test_other.py: a test file missing from COVERAGE"]
    top, every = import_graph(package)
    assert top == {"low.a": {"high.b"}} and every["high.b"] == {"high.c"}  # TYPE_CHECKING left out
    assert upward_imports(package, layers) == {("low.a", "high.b")}
    assert cycles(top) == [] and cycles(every) == [("high.b", "high.c")]
