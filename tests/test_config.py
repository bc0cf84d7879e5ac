"""trainer.config: TOML + typed overrides; unknown keys and bad values name the key and the file."""
import pytest

from trainer.config import ConfigError, load, to_toml


def write(tmp_path, text, name="run.toml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_toml_and_typed_overrides(tmp_path):
    path = write(tmp_path, '[data]\nglobal_batch = 16\nshards = "x"\n[optim]\nlr = 1e-3\nbetas = [0.9, 0.99]\n')
    cfg = load(path, ["train.max_steps=7", "data.varlen=true", "optim.betas=0.8,0.9", "data.layout=none",
                      "train.micro_batch=4", "optim.min_lr=0", "parallel.mode=fsdp"])
    assert cfg.data.global_batch == 16 and cfg.data.shards == "x"
    assert cfg.optim.lr == 1e-3 and cfg.optim.min_lr == 0.0
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.data.varlen is True and cfg.data.streams is None and cfg.train.micro_batch == 4
    assert cfg.optim.betas == (0.8, 0.9) and cfg.parallel.mode == "fsdp"


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = write(tmp_path, "[train]\nmax_stepz = 3\n")
    with pytest.raises(ConfigError) as e:
        load(path)
    assert "train.max_stepz" in str(e.value) and path in str(e.value)


@pytest.mark.parametrize("key, hint", [
    ("train.max_step", "train.max_steps"), ("trian.max_steps", "train.max_steps"),  # a typo in the name, the section
    ("optim.learning_rate", "optim.lr"), ("train.batch_size", "data.global_batch"),  # another trainer's name
    ("checkpoint.save_steps", "checkpoint.every"), ("data.shard", "data.shards"),
    ("optim.foo", None),  # nothing close: no guess
])
def test_an_unknown_key_names_the_nearest_one(key, hint):
    with pytest.raises(ConfigError) as e:
        load(None, [f"{key}=1"])
    msg = str(e.value)
    assert f"unknown key {key!r}" in msg
    assert (f"(did you mean {hint!r}?)" in msg) if hint else ("did you mean" not in msg), msg


def test_unknown_section_and_override(tmp_path):
    path = write(tmp_path, "[trainer]\nmax_steps = 3\n")
    with pytest.raises(ConfigError, match=r"trainer\.max_steps.*section"):
        load(path)
    with pytest.raises(ConfigError, match=r"command line: unknown key 'optim.learning_rate'"):
        load(None, ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="not key=value"):
        load(None, ["train.max_steps"])


@pytest.mark.parametrize("text,key", [("[train]\nmax_steps = \"ten\"\n", "train.max_steps"),
                                      ("[train]\nmax_steps = 1.5\n", "train.max_steps"),
                                      ("[data]\nvarlen = 1\n", "data.varlen"),
                                      ("[optim]\nbetas = [0.9]\n", "optim.betas"),
                                      ("[optim]\nschedule = \"step\"\n", "optim.schedule"),
                                      ("[parallel]\nmode = \"tp\"\n", "parallel.mode"),
                                      ("[optim]\nmin_lr = 1.0\n", "optim.min_lr"),
                                      ("[train]\nmax_bad_steps = 0\n", "train.max_bad_steps"),
                                      ("[optim]\ndecay_steps = -5\n", "optim.decay_steps")])
def test_bad_values_name_key_and_file(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load(path)
    assert key in str(e.value) and path in str(e.value)


@pytest.mark.parametrize("text,key", [("[data]\nglobal_batch = \"4\"\n", "data.global_batch"),
                                      ("[optim]\nlr = \"1e-3\"\n", "optim.lr"),
                                      ("[data]\nvarlen = \"true\"\n", "data.varlen"),
                                      ("[optim]\nbetas = \"0.9,0.95\"\n", "optim.betas"),
                                      ("[train]\nmicro_batch = \"2\"\n", "train.micro_batch"),
                                      ("[[data.sources]]\nname = \"a\"\nshards = \"x\"\nweight = \"1\"\n",
                                       "data.sources[0].weight")])
def test_a_toml_string_where_a_number_belongs_is_refused(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load(path)
    assert f"{path}: {key} = " in str(e.value) and "is not a valid" in str(e.value)
    # the same values as command-line overrides are parsed from their strings
    cfg = load(None, ["data.global_batch=4", "optim.lr=1e-3", "data.varlen=true", "optim.betas=0.9,0.95",
                      "train.micro_batch=2"])
    assert (cfg.data.global_batch, cfg.optim.lr, cfg.data.varlen, cfg.optim.betas, cfg.train.micro_batch) == \
        (4, 1e-3, True, (0.9, 0.95), 2)


def test_bad_override_value_names_key():
    with pytest.raises(ConfigError, match=r"command line: train.max_steps = 'x'"):
        load(None, ["train.max_steps=x"])
    # A value that is well-typed but out of range: the override is the culprit, not the file.
    with pytest.raises(ConfigError, match=r"defaults with the command-line overrides: optim.min_lr must be"):
        load(None, ["optim.min_lr=1"])


def test_missing_and_invalid_toml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load(str(tmp_path / "nope.toml"))
    path = write(tmp_path, "[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(path)


def test_resolved_config_round_trips(tmp_path):
    cfg = load(None, ["optim.betas=0.85,0.9", "data.val_shards=v", "train.max_steps=12", "optim.lr=2e-4"])
    again = load(write(tmp_path, to_toml(cfg), "resolved.toml"))
    assert again.to_dict() == cfg.to_dict()


def test_shipped_run_configs_load():
    import glob
    paths = sorted(glob.glob("configs/*.toml"))
    assert "configs/demo.toml" in paths and "configs/gla_340M.toml" in paths
    for p in paths:
        cfg = load(p)
        assert cfg.model.config.endswith(".json")


MIX = '''[data]
seed = 0
global_batch = 256

[[data.sources]]
name = "web"
shards = "s3://corpus/fineweb-2048"
weight = 0.7
val_shards = "s3://corpus/fineweb-val-2048"

[[data.sources]]
name = "code"
shards = "data/shards/code-2048"
weight = 0.3

[[data.stages]]
start_step = 18000
weights = { web = 0.5, code = 0.5 }
'''


def test_a_mixture_of_sources_with_stages_round_trips(tmp_path):
    cfg = load(write(tmp_path, MIX), ["data.max_repeats=2"])
    assert [(s.name, s.shards, s.weight, s.val_shards) for s in cfg.data.sources] == [
        ("web", "s3://corpus/fineweb-2048", 0.7, "s3://corpus/fineweb-val-2048"),
        ("code", "data/shards/code-2048", 0.3, None)]
    assert [(s.start_step, s.weights) for s in cfg.data.stages] == [(18000, {"web": 0.5, "code": 0.5})]
    assert cfg.data.max_repeats == 2
    again = load(write(tmp_path, to_toml(cfg), "again.toml"))
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("edit, message", [
    (("name = \"code\"", "name = \"web\""), r"data.sources name web more than once"),
    (("name = \"code\"", "name = \"co de\""), r"data.sources\[1\].name = 'co de' must be letters"),
    (("weights = { web = 0.5, code = 0.5 }", "weights = { web = 1 }"), r"data.stages\[0\].weights lacks code"),
    (("weights = { web = 0.5, code = 0.5 }", "weights = { web = 1, cod = 1, code = 0 }"),
     r"data.stages\[0\].weights names unknown source cod"),
    (("start_step = 18000", "start_step = 0"), r"data.stages\[0\].start_step = 0 must be > 0"),
    (("weight = 0.3", "wieght = 0.3"), r"unknown key 'wieght' \(did you mean 'weight'\?\) in \[\[data.sources\]\] number 2"),
    (("global_batch = 256", "global_batch = 256\nshards = \"x\""), r"data.shards and \[\[data.sources\]\] are both set"),
    (("weight = 0.7", "weight = 0"), None),
])
def test_mixture_config_errors_name_the_key(tmp_path, edit, message):
    text = MIX.replace(*edit)
    if message is None:  # a weight of 0 pauses a source; all of them 0 is the error
        load(write(tmp_path, text))
        with pytest.raises(ConfigError, match="weights are all 0"):
            load(write(tmp_path, text.replace("weight = 0.3", "weight = 0")))
        return
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, text))
    with pytest.raises(ConfigError, match=r"command line: data.sources must be written as \[\[data.sources\]\]"):
        load(None, ["data.sources=web"])


def test_precision_choices_and_the_replaced_autocast_key():
    assert load(None, ["train.precision=autocast"]).train.precision == "autocast"
    with pytest.raises(ConfigError, match=r"train.precision = 'fp16' must be one of"):
        load(None, ["train.precision=fp16"])
    with pytest.raises(ConfigError, match=r"command line: train.autocast was replaced by train.precision .*autocast: "
                                          r"the former train.autocast=bf16"):
        load(None, ["train.autocast=bf16"])


def test_data_layout_is_the_old_name_of_data_streams(tmp_path):
    # configs and scripts written before the rename keep working; the resolved config says streams
    cfg = load(write(tmp_path, "[data]\nlayout = 4\nglobal_batch = 8\n"), ["data.layout=2"])
    assert cfg.data.streams == 2
    assert load(write(tmp_path, "[data]\nlayout = 4\n", "old.toml")).data.streams == 4
    text = to_toml(cfg)
    assert "streams = 2" in text and "layout" not in text
    assert load(write(tmp_path, text, "resolved.toml")).data.streams == 2


def test_a_choice_key_takes_only_its_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"parallel.mode = 'dp' must be one of \['none', 'ddp', 'fsdp'\]"):
        load(None, ["parallel.mode=dp"])
    with pytest.raises(ConfigError, match=r"optim.schedule = 3 must be one of"):
        load(write(tmp_path, "[optim]\nschedule = 3\n"))
