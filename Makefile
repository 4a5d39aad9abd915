PY := .venv/bin/python
TOY := data/toyav
TOY_SEED ?= 1337

.PHONY: test toy ablations setup clean

# the runtime requirements (make toy needs no more), then the tests' (transformers, the reference; pytest)
.venv/.runtime: requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

.venv/.installed: .venv/.runtime requirements-dev.txt requirements-data.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

setup: .venv/.installed

test: setup
	$(PY) -m pytest -q tests

# the toy world of seed TOY_SEED (written again only when its seed or generator changes), its pretrained encoders
# (trained again only when their content hash changes), then every stage and its evaluation, then the MrDPO rounds
# (each evaluated on the test split)
toy: .venv/.runtime
	$(PY) $(TOY)/prepare.py --seed $(TOY_SEED) --keep
	rm -rf out/toy/results.json out/toy/vision out/toy/copy out/toy/base out/toy/align out/toy/sft out/toy/mrdpo out/toy/ablations*
	$(PY) $(TOY)/pretrain_encoders.py --config config/toy_vision.py --results out/toy/results.json
	$(PY) train_sft.py config/toy_vision.py
	$(PY) train_sft.py config/toy_copy.py
	$(PY) train_sft.py config/toy_base.py
	$(PY) eval.py --stage=base --ckpt=out/toy/base/final
	$(PY) train_align.py config/toy_align.py
	$(PY) eval.py --stage=align --ckpt=out/toy/align/final
	$(PY) train_sft.py config/toy_sft.py
	$(PY) eval.py --stage=sft --ckpt=out/toy/sft/final
	$(PY) train_mrdpo.py config/toy_mrdpo.py
	@cat out/toy/results.json

# the paper's two MrDPO ablations next to the method, 3 seeds each, from make toy's SFT model: Total per round
ablations: .venv/.runtime
	test -f out/toy/sft/final/train_config.json || $(MAKE) toy
	$(PY) $(TOY)/ablations.py

clean:
	rm -rf .venv out
