PY := .venv/bin/python
TOY := data/toyav

.PHONY: test toy setup clean

.venv/.installed: requirements.txt requirements-dev.txt requirements-data.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

setup: .venv/.installed

test: setup
	$(PY) -m pytest -q tests

# the toy world: data (regenerated only when its generator changes), then every stage and its evaluation,
# then the MrDPO rounds (each evaluated on the test split)
$(TOY)/train.jsonl: $(TOY)/prepare.py | setup
	$(PY) $(TOY)/prepare.py

toy: setup $(TOY)/train.jsonl
	rm -rf out/toy/results.json out/toy/base out/toy/align out/toy/sft out/toy/mrdpo
	$(PY) train_sft.py config/toy_base.py
	$(PY) eval.py --stage=base --ckpt=out/toy/base/final
	$(PY) train_align.py config/toy_align.py
	$(PY) eval.py --stage=align --ckpt=out/toy/align/final
	$(PY) train_sft.py config/toy_sft.py
	$(PY) eval.py --stage=sft --ckpt=out/toy/sft/final
	$(PY) train_mrdpo.py config/toy_mrdpo.py
	@cat out/toy/results.json

clean:
	rm -rf .venv out
