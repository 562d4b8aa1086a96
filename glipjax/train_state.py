"""The model, its sharded training state and the update step, built from a run config.

Shared by the trainer (glipjax.train), the ahead-of-time check (glipjax.aot) and
the commands that load a checkpoint (evaluate, predict, export), so all of them see
the same state tree:
  {"params", "opt_state", "ema" ({} without EMA), "step", "rng"}.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from glipjax import convert, optim, pretrained, sharding
from glipjax.models.bert import BertConfig
from glipjax.models.glip import GLIP, GLIPConfig, config_from_fields, losses

State = dict[str, Any]
Rules = Sequence[Sequence[Any]]


def build_model(config: ml_collections.ConfigDict, load_text_weights: bool = True) -> tuple[GLIP, GLIPConfig, Any]:
    """(model, its GLIPConfig, the pretrained text-encoder params or None) from
    config.model and config.data.max_text_len. With load_text_weights=False only the
    encoder's config is read (its weights come from a checkpoint instead)."""
    text_config, text_params = None, None
    if config.model.text_encoder:
        folder = pretrained.resolve_text_encoder(config.model.text_encoder)
        if load_text_weights:
            text_config, text_params = convert.load_hf_bert(folder)
        else:
            text_config = BertConfig.from_json_file(folder / "config.json")
    glip_config = config_from_fields(config.model, text_config, config.data.max_text_len)
    if text_params is not None:  # model.text_layers may keep only the first layers
        layers = glip_config.head.text.num_hidden_layers
        encoder = {k: v for k, v in text_params["encoder"].items() if int(k.split("_")[-1]) < layers}
        text_params = dict(text_params, encoder=encoder)
    return GLIP(glip_config, dtype=jnp.dtype(config.model.dtype)), glip_config, text_params


def make_tx(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformationExtraArgs, optax.Schedule]:
    """The optimizer and its lr schedule over config.train.steps."""
    return optim.make_optimizer(config.optim, config.train.steps), optim.make_schedule(config.optim, config.train.steps)


def _init_fn(config: ml_collections.ConfigDict, model: GLIP) -> Callable[[jax.Array, Any], Any]:
    canvas, length = tuple(config.data.canvas), config.data.max_text_len
    example = (jnp.zeros((1, *canvas, 3)), jnp.zeros((1, length), jnp.int32), jnp.ones((1, length), jnp.int32))

    def init_params(rng, pretrained_text):
        params = model.init(rng, *example)["params"]
        if pretrained_text is not None:  # an argument, not a jit constant: same logical boxes
            params = dict(params)
            params["language_backbone"] = jax.tree_util.tree_map(
                lambda box, value: box.replace_boxed(value), params["language_backbone"], pretrained_text,
                is_leaf=lambda x: hasattr(x, "replace_boxed"),
            )
        return params

    return init_params


def _state(config: ml_collections.ConfigDict, params: Any, opt_state: Any, ema: Any) -> State:
    return {"params": params, "opt_state": opt_state, "ema": ema if config.optim.ema_decay else {},
            "step": jnp.zeros((), jnp.int32), "rng": jax.random.PRNGKey(config.seed + 1)}


def init_state(config: ml_collections.ConfigDict, model: GLIP, tx: optax.GradientTransformation,
               mesh: jax.sharding.Mesh, rules: Rules, text_params: Any = None, abstract: State | None = None) -> State:
    """The initial state, created already sharded (no full copy on any device).
    `abstract`: abstract_state's result for the same arguments, when at hand (the
    model's init is then traced once instead of twice)."""
    shapes = None if abstract is None else (abstract["params"], abstract["opt_state"])
    with sharding.sharding_context(mesh, rules):
        params, opt_state = sharding.create_sharded(
            _init_fn(config, model), mesh, rules, jax.random.PRNGKey(config.seed), text_params, tx=tx, shapes=shapes)
    state = _state(config, params, opt_state, jax.tree_util.tree_map(jnp.copy, params))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return dict(state, step=jax.device_put(state["step"], replicated), rng=jax.device_put(state["rng"], replicated))


def abstract_state(config: ml_collections.ConfigDict, model: GLIP, tx: optax.GradientTransformation,
                   mesh: jax.sharding.Mesh, rules: Rules) -> State:
    """The state's shapes, dtypes and shardings (jax.ShapeDtypeStructs), without
    allocating it: for restoring a checkpoint or compiling ahead of time."""
    with sharding.sharding_context(mesh, rules):
        params, opt_state = sharding.sharded_shapes(
            _init_fn(config, model), mesh, rules, jax.random.PRNGKey(config.seed), None, tx=tx)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = _state(config, params, opt_state, params)
    state["step"] = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    rng = jax.eval_shape(jax.random.PRNGKey, 0)
    state["rng"] = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=replicated)
    return state


class TrainStep(NamedTuple):
    """The update step as two programs, run one after the other:

        gradients(state, batch) -> (grads, loss, parts)
        update(state, grads, loss, parts) -> (state, metrics)   (the state donated)

    Called as step(state, batch) -> (state, metrics). XLA:CPU compiles the two in 16-28%
    less time than one program of the same math (GLIP-T: docs/benchmarks.md), with
    about the same peak memory (docs/scaling.md): only the gradients and the loss pass
    between them, and one program holds all the gradients at once too. `grads` leaves out frozen params
    (optax.MaskedNode), so they cost no memory between the programs."""

    gradients: Callable[..., Any]
    update: Callable[..., Any]

    def __call__(self, state: State, batch: dict[str, jax.Array]) -> tuple[State, dict[str, jax.Array]]:
        grads, loss, parts = self.gradients(state, batch)
        return self.update(state, grads, loss, parts)

    def lower(self, state: State, batch: dict[str, Any]) -> tuple[jax.stages.Lowered, jax.stages.Lowered]:
        """Both programs lowered for (state, batch), which may be abstract; call it in
        the sharding context the step was made in."""
        gradients = self.gradients.lower(state, batch)
        return gradients, self.update.lower(state, *gradients.out_info)

    def compile(self, state: State, batch: dict[str, Any], compiler_options: dict[str, Any] | None = None) -> TrainStep:
        """The step with both programs compiled for (state, batch)."""
        return TrainStep(*(lowered.compile(compiler_options) for lowered in self.lower(state, batch)))


def jit_train_step(config: ml_collections.ConfigDict, model: GLIP, glip_config: GLIPConfig,
                   tx: optax.GradientTransformationExtraArgs, schedule: optax.Schedule, state: State,
                   mesh: jax.sharding.Mesh, rules: Rules) -> TrainStep:
    """The jitted TrainStep for `state` (which may be abstract): state in and out with its
    shardings, gradients with the params', the batch split over the batch axes.
    Frozen params (config.optim.frozen) enter the loss under stop_gradient, so their
    backward pass is never computed."""
    dtype = jnp.dtype(config.model.dtype)
    canvas = tuple(config.data.canvas)
    ema_decay = config.optim.ema_decay
    frozen = jax.tree.map(lambda g: g == "frozen", optim.param_groups(state["params"], config.optim))

    def gradients(state: State, batch: dict[str, jax.Array]) -> tuple[Any, jax.Array, dict[str, jax.Array]]:
        _, dropout_rng = jax.random.split(state["rng"])

        def loss_fn(params):
            params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
            out = model.apply({"params": params}, batch["images"].astype(dtype), batch["input_ids"],
                              batch["attention_mask"], deterministic=False, rngs={"dropout": dropout_rng})
            parts = losses(glip_config, out, batch["gt_boxes"], batch["gt_mask"], batch["positive_map"],
                           batch["attention_mask"], canvas)
            return parts["total"], parts

        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        return jax.tree.map(lambda g, f: optax.MaskedNode() if f else g, grads, frozen), loss, parts

    def update(state: State, grads: Any, loss: jax.Array,
               parts: dict[str, jax.Array]) -> tuple[State, dict[str, jax.Array]]:
        rng, _ = jax.random.split(state["rng"])  # the split gradients() took its dropout key from
        grads = jax.tree.map(lambda p, g: jnp.zeros_like(p) if isinstance(g, optax.MaskedNode) else g,
                             state["params"], grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"], loss=loss)
        params = optax.apply_updates(state["params"], updates)
        ema = optim.ema_update(state["ema"], params, ema_decay) if ema_decay else state["ema"]
        consecutive, total_bad = optim.bad_step_counts(opt_state)
        metrics = {
            "loss": loss, "token": parts["token"], "giou": parts["giou"], "centerness": parts["centerness"],
            "positives": parts["num_positives"], "grad_norm": optax.global_norm(grads),
            "lr": schedule(optim.applied_updates(opt_state)), "bad_steps": total_bad, "bad_streak": consecutive,
        }
        new_state = dict(state, params=params, opt_state=opt_state, ema=ema, step=state["step"] + 1, rng=rng)
        return new_state, metrics

    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    grads_shardings = jax.tree.map(lambda s, f: optax.MaskedNode() if f else s, state_shardings["params"], frozen)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    with sharding.sharding_context(mesh, rules):
        return TrainStep(
            jax.jit(gradients, in_shardings=(state_shardings, sharding.batch_sharding(mesh, rules)),
                    out_shardings=(grads_shardings, replicated, replicated)),
            jax.jit(update, in_shardings=(state_shardings, grads_shardings, replicated, replicated),
                    out_shardings=(state_shardings, None), donate_argnums=(0,)))
