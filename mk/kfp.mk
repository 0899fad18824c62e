# Kubeflow Pipelines targets (included by the Makefile).
#   make compile      pipelines/gdmix_pipeline.yaml from examples/movielens.yaml (checked in,
#                     images tagged with the package version)
#   make compile-run  build/gdmix_pipeline.yaml: the same, images tagged IMAGE_TAG (what
#                     run-local, submit and schedule upload)
#   make images       the base, trainer and spark images (docker, else buildah), tagged IMAGE_TAG
#   make image-tag    print IMAGE_TAG
#   make images-push  push them to REGISTRY
#   make base-image   a debootstrap'd Debian bookworm base (LOCAL_BASE), for machines that
#                     reach Debian's mirrors and PyPI but no registry; then
#                     make images BASE_IMAGE=localhost/debian-base:bookworm
#   make images-local both, in that order
#   make images-check `gdmix --help` in the trainer image (podman, else docker; no network)
#   make run-local    kind/minikube cluster + KFP + training operator + images + one run
#   make submit       run the compiled pipeline on an existing KFP (KFP_HOST=...)
#   make schedule     a recurring run on an existing KFP (KFP_HOST=..., CRON=...)
# IMAGE_TAG defaults to a content tag, <version>-<hash of what goes into the images and the
# build arguments> (src/gdmix/kfp/images.py), so a changed image never hides behind an old tag.
KFP_CONFIG   ?= examples/movielens.yaml
KFP_PIPELINE_REF ?= pipelines/gdmix_pipeline.yaml
KFP_PIPELINE ?= build/gdmix_pipeline.yaml
REGISTRY     ?= localhost
VERSION      := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
BASE_IMAGE   ?= docker.io/library/python:3.11-slim-bookworm
# The Cloud Storage connector in the spark image (gs:// in Spark): off unless both are set.
GCS_CONNECTOR_VERSION ?=
GCS_CONNECTOR_SHA256  ?=
GCS_CONNECTOR_URL     ?=
IMAGE_BUILD_ARGS = --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg GCS_CONNECTOR_VERSION=$(GCS_CONNECTOR_VERSION) \
	--build-arg GCS_CONNECTOR_SHA256=$(GCS_CONNECTOR_SHA256) --build-arg GCS_CONNECTOR_URL=$(GCS_CONNECTOR_URL)
# Computed once, on first use (not for targets that never use it).
IMAGE_TAG    ?= $(eval IMAGE_TAG := $(shell $(PYTHON) src/gdmix/kfp/images.py tag $(IMAGE_BUILD_ARGS)))$(IMAGE_TAG)
LOCAL_BASE   ?= localhost/debian-base:bookworm
CLUSTER      ?= gdmix
KFP_HOST     ?=
KFP_PORT     ?= 8080
CRON         ?= 0 3 * * *
ITERATIONS   ?=
KFP_WAIT_S   ?= 3600
KFP_PROGRESS_S ?= 60
KFP_COMPILE_ARGS ?=
# minikube's size for run-local (docs/cluster.md: what the demo needs at once).
MINIKUBE_CPUS   ?= 4
MINIKUBE_MEMORY ?= 12g
# The work volume: manifests/gdmix (the cluster's default storage class, ReadWriteOnce), or
# a ReadWriteMany overlay under manifests/storage/ (filestore, nfs, gcs-fuse-csi).
WORK_STORAGE ?=
WORK_MANIFESTS = $(if $(WORK_STORAGE),manifests/storage/$(WORK_STORAGE),manifests/gdmix)

image = $(REGISTRY)/gdmix-$(1):$(IMAGE_TAG)
# $(call need,TOOL,HINT): stop with a clear message when TOOL is missing.
need = command -v $(1) >/dev/null 2>&1 || { echo "make $@: '$(1)' not found. $(2)" >&2; exit 1; }
# The image builder: docker when its daemon answers, else buildah (rootless-friendly).
BUILDER = $$(if docker info >/dev/null 2>&1; then echo docker; \
             elif command -v buildah >/dev/null 2>&1; then echo buildah; fi)

.PHONY: compile compile-run image-tag images images-push base-image images-local images-check run-local submit schedule \
	kfp-check-host

## The checked-in pipeline YAML for KFP_CONFIG (structure from the config; images
## REGISTRY/<version>: a reference, tests/test_pipeline.py keeps it current).
compile: install
	$(PY) pipelines/gdmix_pipeline.py $(KFP_CONFIG) --out $(KFP_PIPELINE_REF) \
		--registry $(REGISTRY) --tag $(VERSION)

## The pipeline YAML that is uploaded: images REGISTRY/IMAGE_TAG (the content tag).
## KFP_COMPILE_ARGS: more options of pipelines/gdmix_pipeline.py, e.g. for a gs:// work
## directory without a volume: KFP_COMPILE_ARGS="--work-volume '' --runs-root-url gs://b/runs/x".
compile-run: install
	@mkdir -p $(dir $(KFP_PIPELINE))
	$(PY) pipelines/gdmix_pipeline.py $(KFP_CONFIG) --out $(KFP_PIPELINE) \
		--registry $(REGISTRY) --tag $(IMAGE_TAG) $(KFP_COMPILE_ARGS)

## Push the three images to REGISTRY (a cluster that pulls, e.g. GKE with Artifact Registry:
## REGISTRY=europe-docker.pkg.dev/PROJECT/REPO make images images-push).
images-push:
	@b=$(BUILDER); [ -n "$$b" ] || { echo "make images-push: needs docker or buildah" >&2; exit 1; }; \
	set -ex; for kind in base trainer spark; do $$b push $(REGISTRY)/gdmix-$$kind:$(IMAGE_TAG); done

image-tag:
	@echo $(IMAGE_TAG)

## Build the images: base (deps + gdmix), trainer, spark. BASE_IMAGE: the Python base.
images:
	@b=$(BUILDER); \
	if [ -z "$$b" ]; then echo "make images: needs docker with a running daemon, or buildah" \
		"(apt-get install buildah; it builds with --isolation chroot, no daemon)" >&2; exit 1; fi; \
	if [ "$$b" = buildah ]; then build="buildah bud --isolation chroot --layers"; else build="docker build"; fi; \
	set -ex; \
	$$build --build-arg BASE_IMAGE=$(BASE_IMAGE) -f images/base/Dockerfile -t $(call image,base) . ; \
	$$build --build-arg BASE_IMAGE=$(call image,base) -f images/trainer/Dockerfile -t $(call image,trainer) . ; \
	$$build --build-arg BASE_IMAGE=$(call image,base) --build-arg GCS_CONNECTOR_VERSION=$(GCS_CONNECTOR_VERSION) \
		--build-arg GCS_CONNECTOR_SHA256=$(GCS_CONNECTOR_SHA256) --build-arg GCS_CONNECTOR_URL=$(GCS_CONNECTOR_URL) \
		-f images/spark/Dockerfile -t $(call image,spark) .

## A Debian bookworm base image made with debootstrap (root; no registry needed).
base-image:
	@$(call need,debootstrap,apt-get install debootstrap)
	@$(call need,buildah,apt-get install buildah)
	images/make-base.sh $(LOCAL_BASE)

## The images on the debootstrap base (no registry needed).
images-local: base-image
	$(MAKE) images BASE_IMAGE=$(LOCAL_BASE)

## Smoke test: the trainer image runs `gdmix --help`. The explicit ulimits: podman as root
## otherwise asks for limits above the host's hard ones (runc: "error setting rlimit").
images-check:
	@set -e; if command -v podman >/dev/null 2>&1; then \
		run="podman run --rm --network none --pull never --ulimit nofile=4096:4096 --ulimit nproc=4096:4096"; \
		if command -v runc >/dev/null 2>&1; then run="$$run --runtime runc"; fi; \
	elif docker info >/dev/null 2>&1; then run="docker run --rm --network none"; \
	else echo "make images-check: needs podman or docker" >&2; exit 1; fi; \
	set -x; $$run $(call image,trainer) gdmix --help

## A local cluster (kind, else minikube) with KFP, the training operator, RBAC, the work
## volume, the images and the MovieLens data; then one pipeline run.
run-local: KFP_COMPILE_ARGS += --resources local  # requests that fit a 4-CPU node (docs/cluster.md)
run-local: compile-run images
	@$(call need,kubectl,Install kubectl: https://kubernetes.io/docs/tasks/tools/)
	@if command -v kind >/dev/null 2>&1; then \
		kind get clusters 2>/dev/null | grep -qx '$(CLUSTER)' \
			|| kind create cluster --name $(CLUSTER) --config manifests/kind/cluster.yaml --wait 300s; \
		kubectl config use-context kind-$(CLUSTER); \
	elif command -v minikube >/dev/null 2>&1; then \
		minikube status -p $(CLUSTER) >/dev/null 2>&1 \
			|| minikube start -p $(CLUSTER) --cpus $(MINIKUBE_CPUS) --memory $(MINIKUBE_MEMORY) --wait all; \
		kubectl config use-context $(CLUSTER); \
	else echo "make run-local: needs kind or minikube (https://kind.sigs.k8s.io/)" >&2; exit 1; fi
	kubectl apply -k manifests/kfp/cluster-scoped
	kubectl wait --for condition=established --timeout=120s crd/applications.app.k8s.io
	kubectl apply -k manifests/kfp/platform
	kubectl apply --server-side -k manifests/training-operator
	kubectl apply -k $(WORK_MANIFESTS)
	@set -e; b=$(BUILDER); for kind in base trainer spark; do \
		img=$(REGISTRY)/gdmix-$$kind:$(IMAGE_TAG); echo "loading $$img"; \
		if command -v kind >/dev/null 2>&1; then \
			if [ "$$b" = docker ]; then kind load docker-image --name $(CLUSTER) $$img; \
			else tar=$$(mktemp --suffix .tar); rm -f $$tar; \
				buildah push $$img docker-archive:$$tar:$$img; \
				kind load image-archive --name $(CLUSTER) $$tar; rm -f $$tar; fi; \
		else minikube -p $(CLUSTER) image load $$img; fi; done
	kubectl -n kubeflow wait --for=condition=available deployment --all --timeout=900s
	sed 's#localhost/gdmix-base:[^ ]*#$(call image,base)#' manifests/jobs/movielens-data.yaml | kubectl apply -f -
	kubectl -n kubeflow wait --for=condition=complete job/gdmix-movielens-data --timeout=1800s
	@set -e; kubectl -n kubeflow port-forward svc/ml-pipeline-ui $(KFP_PORT):80 >/tmp/gdmix-kfp-port-forward.log 2>&1 & \
	pf=$$!; trap "kill $$pf" EXIT; \
	for i in $$(seq 60); do curl -sf http://localhost:$(KFP_PORT)/apis/v2beta1/healthz >/dev/null && break; sleep 2; done; \
	$(PY) -m gdmix.kfp.submit run --host http://localhost:$(KFP_PORT) --package $(KFP_PIPELINE) \
		$(if $(ITERATIONS),--iterations $(ITERATIONS)) --wait $(KFP_WAIT_S) --progress $(KFP_PROGRESS_S); \
	echo "KFP UI: kubectl -n kubeflow port-forward svc/ml-pipeline-ui $(KFP_PORT):80, then open http://localhost:$(KFP_PORT)"

kfp-check-host:
	@[ -n "$(KFP_HOST)" ] || { echo "make $(MAKECMDGOALS): set KFP_HOST to the KFP API endpoint," \
		"e.g. KFP_HOST=http://localhost:8080 after 'kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80'" >&2; exit 1; }

## Run the compiled pipeline on an existing KFP endpoint.
submit: kfp-check-host compile-run
	$(PY) -m gdmix.kfp.submit run --host $(KFP_HOST) --package $(KFP_PIPELINE) \
		$(if $(ITERATIONS),--iterations $(ITERATIONS))

## A recurring retrain on an existing KFP endpoint (CRON: 5-field cron, default daily 03:00).
schedule: kfp-check-host compile-run
	$(PY) -m gdmix.kfp.submit schedule --host $(KFP_HOST) --package $(KFP_PIPELINE) --cron "$(CRON)" \
		$(if $(ITERATIONS),--iterations $(ITERATIONS))
