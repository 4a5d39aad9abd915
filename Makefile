PY := .venv/bin/python
TOY := data/toyav
TOY_SEED ?= 1337

.PHONY: test toy read ablations setup clean

.venv/.installed: requirements.txt requirements-dev.txt requirements-data.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

setup: .venv/.installed

test: setup
	$(PY) -m pytest -q tests

# the toy world of seed TOY_SEED (written again only when its seed or generator changes), its pretrained encoders
# (trained again only when their content hash changes), then every stage and its evaluation, then the MrDPO rounds
# (each evaluated on the test split)
toy: setup
	$(PY) $(TOY)/prepare.py --seed $(TOY_SEED) --keep
	rm -rf out/toy/results.json out/toy/vision out/toy/base out/toy/align out/toy/sft out/toy/mrdpo out/toy/ablations*
	$(PY) $(TOY)/pretrain_encoders.py --config config/toy_vision.py --results out/toy/results.json
	$(PY) train_sft.py config/toy_vision.py
	$(PY) train_sft.py config/toy_base.py
	$(PY) eval.py --stage=base --ckpt=out/toy/base/final
	$(PY) train_align.py config/toy_align.py
	$(PY) eval.py --stage=align --ckpt=out/toy/align/final
	$(PY) train_sft.py config/toy_sft.py
	$(PY) eval.py --stage=sft --ckpt=out/toy/sft/final
	$(PY) train_mrdpo.py config/toy_mrdpo.py
	@cat out/toy/results.json

# the toy that reads what it hears (not make toy's chain): make toy's vision LLM learns to copy, then to read its
# soundtrack written in words where the aligner's tokens go (seeing on); the aligner learns speech and sounds anchored
# to those words (training.py's anchor), each of its tokens read as its nearest word (snap_audio); then the paper's AV
# SFT on it, the aligner kept as aligned (trained on, it leaves its words). Its rates go to out/toy/read/results.json
read: setup
	test -f out/toy/vision/final/train_config.json || $(MAKE) toy
	rm -rf out/toy/copy out/toy/read
	$(PY) train_sft.py config/toy_copy.py
	$(PY) train_sft.py config/toy_read.py
	$(PY) eval.py --stage=base --ckpt=out/toy/read/base/final --results=out/toy/read/results.json
	$(PY) train_align.py config/toy_align.py --init_from=out/toy/read/base/final --anchor=1.0 --anchor_sounds=True \
		--snap_audio=True --steps=600 --out_dir=out/toy/read/align
	$(PY) eval.py --stage=align --ckpt=out/toy/read/align/final --results=out/toy/read/results.json
	$(PY) train_sft.py config/toy_sft.py --init_from=out/toy/read/align/final --steps=400 "--trainable=('lora_',)" \
		--out_dir=out/toy/read/sft
	$(PY) eval.py --stage=sft --ckpt=out/toy/read/sft/final --results=out/toy/read/results.json
	@cat out/toy/read/results.json

# the paper's two MrDPO ablations next to the method, 3 seeds each, from make toy's SFT model: Total per round
ablations: setup
	test -f out/toy/sft/final/train_config.json || $(MAKE) toy
	$(PY) $(TOY)/ablations.py

clean:
	rm -rf .venv out
