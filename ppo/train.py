"""Train PPO (Schulman et al., 2017) on a gymnasium classic-control task. The defaults solve CartPole-v1.

    python train.py                                        # CartPole-v1, 100k steps, 15-20 s on a 2-core CPU
    python train.py --env-id Acrobot-v1 --total-steps 300000
    python train.py --env-id Pendulum-v1 ...                # continuous actions: see README.md for the flags

Each iteration: collect num_steps x num_envs transitions with the current policy, compute GAE advantages
(model.gae), then run update_epochs passes of shuffled minibatches over the clipped objective (model.ppo_loss).
"""
import argparse
import csv
import json
import os
import random
import sys
import time
from pathlib import Path

import gymnasium as gym
import matplotlib
import numpy as np
import torch
from tqdm import tqdm

from model import Agent, gae, ppo_loss
from sample import evaluate, get_device, load_checkpoint

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

IMAGES = Path(__file__).resolve().parent.parent / "images"
# Flags that may differ from the checkpoint's when resuming; every other flag is taken from the checkpoint.
RESUME_OVERRIDES = {"total_steps", "out_dir", "device", "wandb", "plot", "eval_episodes", "resume"}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--env-id", default="CartPole-v1", help="gymnasium id with a flat Box observation space")
    p.add_argument("--total-steps", type=int, default=100_000, help="environment steps to train for")
    p.add_argument("--num-envs", type=int, default=8, help="parallel environments (a SyncVectorEnv)")
    p.add_argument("--num-steps", type=int, default=32, help="steps per environment per rollout")
    p.add_argument("--num-minibatches", type=int, default=1, help="minibatches per epoch over one rollout")
    p.add_argument("--update-epochs", type=int, default=10, help="passes over each rollout (K in the paper)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--anneal-lr", action=argparse.BooleanOptionalAction, default=True,
                   help="decay the learning rate linearly to 0 over the run")
    p.add_argument("--gamma", type=float, default=0.98, help="discount factor")
    p.add_argument("--gae-lambda", type=float, default=0.8, help="lambda of GAE (Eq. 11)")
    p.add_argument("--clip-coef", type=float, default=0.2, help="epsilon of the clipped objective (Eq. 7)")
    p.add_argument("--clip-vloss", action=argparse.BooleanOptionalAction, default=False,
                   help="clip the value update like the policy's (OpenAI baselines)")
    p.add_argument("--ent-coef", type=float, default=0.0, help="c2, weight of the entropy bonus (Eq. 9)")
    p.add_argument("--vf-coef", type=float, default=0.5, help="c1, weight of the value loss (Eq. 9)")
    p.add_argument("--max-grad-norm", type=float, default=0.5, help="clip the global gradient norm to this")
    p.add_argument("--target-kl", type=float, default=None,
                   help="stop an update's epochs early once the approximate KL exceeds this")
    p.add_argument("--hidden-size", type=int, default=64, help="units in each of the two hidden layers")
    p.add_argument("--norm-obs", action=argparse.BooleanOptionalAction, default=False,
                   help="normalize observations by running mean and std (for continuous control)")
    p.add_argument("--reward-scale", type=float, default=1.0, help="multiply rewards by this for learning")
    p.add_argument("--init-log-std", type=float, default=None,
                   help="continuous actions only: initial log std of the Gaussian policy (default 0)")
    p.add_argument("--eval-episodes", type=int, default=100,
                   help="deterministic evaluation episodes after training (0: none)")
    p.add_argument("--seed", type=int, default=1, help="seeds Python, NumPy, torch and the environments")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto picks cuda, then mps, then cpu; a 64-unit MLP is fastest on the CPU")
    p.add_argument("--out-dir", default="runs/ppo", help="where the checkpoint and CSVs go")
    p.add_argument("--resume", default=None, help="checkpoint to continue from (its flags are reused)")
    p.add_argument("--plot", default=str(IMAGES / "ppo_learning_curve.png"),
                   help="learning-curve PNG to write ('' for none)")
    p.add_argument("--compile", action="store_true", help="torch.compile the agent")
    p.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (WANDB_MODE=offline works)")
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "data"),
                   help="unused: gymnasium simulates the environments (kept for the repo's common flags)")
    return p


def parse_args(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    for name in ["total_steps", "num_envs", "num_steps", "num_minibatches", "update_epochs", "hidden_size"]:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.num_minibatches > args.num_envs * args.num_steps:
        parser.error("--num-minibatches cannot exceed --num-envs x --num-steps")
    if args.env_id not in gym.registry:
        parser.error(f"unknown --env-id {args.env_id!r}; try CartPole-v1, Acrobot-v1, MountainCar-v0, Pendulum-v1")
    try:
        env = gym.make(args.env_id)
    except Exception as e:  # e.g. a Box2D or MuJoCo id whose extra packages are not installed
        parser.error(f"--env-id {args.env_id} cannot be built here: {str(e).splitlines()[0]}")
    obs_space, action_space = env.observation_space, env.action_space
    env.close()
    if not (isinstance(obs_space, gym.spaces.Box) and len(obs_space.shape) == 1):
        parser.error(f"--env-id {args.env_id} has observations {obs_space}; this MLP agent needs a flat Box")
    if not isinstance(action_space, (gym.spaces.Discrete, gym.spaces.Box)):
        parser.error(f"--env-id {args.env_id} has actions {action_space}; need Discrete or Box")
    if isinstance(action_space, gym.spaces.Discrete) and args.init_log_std is not None:
        parser.error(f"--init-log-std is for continuous actions; {args.env_id} has discrete actions")
    return args


def get_env_state(envs):
    """Everything a classic-control sub-environment needs to continue its episode, as plain data."""
    return [{"state": np.asarray(env.unwrapped.state).tolist(),
             "steps_beyond_terminated": getattr(env.unwrapped, "steps_beyond_terminated", None),
             "elapsed_steps": env.get_wrapper_attr("_elapsed_steps"),
             "np_random": json.dumps(env.unwrapped.np_random.bit_generator.state)} for env in envs.envs]


def set_env_state(envs, states, prev_done):
    for env, s in zip(envs.envs, states):
        env.unwrapped.state = np.array(s["state"], dtype=np.asarray(env.unwrapped.state).dtype)
        if s["steps_beyond_terminated"] is not None:
            env.unwrapped.steps_beyond_terminated = s["steps_beyond_terminated"]
        env.set_wrapper_attr("_elapsed_steps", s["elapsed_steps"])
        env.unwrapped.np_random.bit_generator.state = json.loads(s["np_random"])
    envs._autoreset_envs = prev_done.copy()  # the vector env resets these on the next step


def rollout(envs, agent, state, num_steps, reward_scale, device):
    """Run the policy for num_steps steps in every environment; returns (T, N) arrays and finished episodes.

    `state` carries what survives between rollouts: the current observation, which environments ended their
    episode on the previous step, and the return and length of the episodes in progress. gymnasium 1.x vector
    environments reset an environment on the step *after* its episode ended: that step ignores the action,
    returns reward 0 and the first observation of the next episode. It is not a transition of the MDP, so it
    is marked valid = 0 here and left out of the update.
    """
    T, N = num_steps, envs.num_envs
    b = {k: np.zeros((T, N), dtype=np.float32) for k in ["rewards", "terminations", "dones", "valid"]}
    b["obs"] = np.zeros((T, N) + envs.single_observation_space.shape, dtype=np.float32)
    b["actions"] = np.zeros((T, N) + envs.single_action_space.shape, dtype=np.float32)
    episodes = []  # (return, length) of each episode that ended in this rollout
    for t in range(T):
        with torch.no_grad():
            action = agent.act(torch.as_tensor(state["obs"], dtype=torch.float32, device=device)).cpu().numpy()
        # the Gaussian is unbounded: clip what the environment sees, learn from the sampled action
        env_action = np.clip(action, envs.single_action_space.low, envs.single_action_space.high) \
            if agent.continuous else action
        next_obs, reward, terminated, truncated, _ = envs.step(env_action)
        valid = ~state["prev_done"]
        done = terminated | truncated
        b["obs"][t], b["actions"][t], b["valid"][t] = state["obs"], action, valid
        b["rewards"][t], b["terminations"][t], b["dones"][t] = reward * reward_scale, terminated, done
        state["episode_return"] += reward * valid  # raw rewards: what the task scores
        state["episode_length"] += valid
        for i in np.flatnonzero(done):
            episodes.append((float(state["episode_return"][i]), int(state["episode_length"][i])))
            state["episode_return"][i], state["episode_length"][i] = 0.0, 0
        state["obs"], state["prev_done"] = next_obs, done
    # theta_old is fixed during the rollout, so its log-probabilities and values are computed in one batched call
    with torch.no_grad():
        log_probs, _, values = agent.evaluate_actions(torch.from_numpy(b["obs"]).flatten(0, 1).to(device),
                                                      torch.from_numpy(b["actions"]).flatten(0, 1).to(device))
        next_value = agent.get_value(torch.as_tensor(state["obs"], dtype=torch.float32, device=device))
    b["log_probs"], b["values"] = log_probs.view(T, N).cpu().numpy(), values.view(T, N).cpu().numpy()
    b["next_value"] = next_value.cpu().numpy()
    return b, episodes


def ppo_update(agent, optimizer, b, args):
    """update_epochs passes of shuffled minibatches over the valid steps of one rollout (Algorithm 1)."""
    advantages, returns = gae(b["rewards"], b["values"], b["next_value"], b["terminations"], b["dones"],
                              args.gamma, args.gae_lambda)  # in NumPy: a loop of tiny operations, faster there
    device = next(agent.parameters()).device
    b = {k: torch.from_numpy(b[k]).to(device) for k in ["obs", "actions", "log_probs", "values", "valid"]}
    advantages, returns = torch.from_numpy(advantages).to(device), torch.from_numpy(returns).to(device)
    keep = b["valid"].flatten().bool()  # drop the autoreset steps: not transitions of the MDP
    obs, actions = b["obs"].flatten(0, 1)[keep], b["actions"].flatten(0, 1)[keep]
    log_probs, values = b["log_probs"].flatten()[keep], b["values"].flatten()[keep]
    advantages, returns = advantages.flatten()[keep], returns.flatten()[keep]
    n = obs.shape[0]
    minibatch_size = -(-n // args.num_minibatches)
    for _ in range(args.update_epochs):
        for mb in torch.randperm(n, device=obs.device).split(minibatch_size):
            new_log_prob, entropy, new_value = agent.evaluate_actions(obs[mb], actions[mb])
            mb_adv = advantages[mb]
            if len(mb) > 1:  # advantage normalization per minibatch
                mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
            loss, stats = ppo_loss(new_log_prob, log_probs[mb], mb_adv, new_value, values[mb], returns[mb],
                                   entropy, args.clip_coef, args.vf_coef, args.ent_coef, args.clip_vloss)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            optimizer.step()
        if args.target_kl is not None and stats["approx_kl"] > args.target_kl:
            break
    var_y = returns.var()
    stats["explained_var"] = float("nan") if var_y == 0 else (1 - (returns - values).var() / var_y).item()
    return stats


def plot_learning_curve(episodes_csv, path, env_id):
    with open(episodes_csv) as f:
        rows = list(csv.DictReader(f))
    steps = np.array([int(r["step"]) for r in rows])
    returns = np.array([float(r["return"]) for r in rows])
    if len(returns) == 0:
        print(f"no episode finished: no learning curve written to {path}")
        return
    window = min(20, len(returns))
    smooth = np.convolve(returns, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, returns, ".", ms=2, alpha=0.3, color="tab:blue", label="episode")
    ax.plot(steps[window - 1:], smooth, color="tab:blue", label=f"mean of last {window}")
    threshold = gym.spec(env_id).reward_threshold
    if threshold is not None:
        ax.axhline(threshold, ls="--", color="gray", lw=1, label=f"solved ({threshold:g})")
    ax.set(xlabel="environment steps", ylabel="episodic return", title=f"PPO on {env_id}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None):
    args = parse_args(argv)
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.resume, "cpu")
        for k, v in ckpt["config"].items():
            if k not in RESUME_OVERRIDES:
                setattr(args, k, v)
    device = get_device(args.device)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if device == "cpu":
        torch.set_num_threads(1)  # a 64-unit MLP is too small to split across threads: one is faster
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    envs = gym.make_vec(args.env_id, num_envs=args.num_envs, vectorization_mode="sync")
    assert envs.metadata["autoreset_mode"] == gym.vector.AutoresetMode.NEXT_STEP, "rollout() assumes next-step"
    continuous = isinstance(envs.single_action_space, gym.spaces.Box)
    model_args = {"obs_dim": envs.single_observation_space.shape[0], "continuous": continuous,
                  "action_dim": envs.single_action_space.shape[0] if continuous else int(envs.single_action_space.n),
                  "hidden_size": args.hidden_size, "norm_obs": args.norm_obs,
                  "init_log_std": args.init_log_std or 0.0}
    agent = Agent(**model_args).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.lr, eps=1e-5, fused=device != "mps")
    obs, _ = envs.reset(seed=args.seed)
    state = {"obs": obs, "prev_done": np.zeros(args.num_envs, dtype=bool),
             "episode_return": np.zeros(args.num_envs), "episode_length": np.zeros(args.num_envs, dtype=np.int64)}
    step, iteration = 0, 0
    if ckpt is not None:
        agent.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, iteration = ckpt["step"], ckpt["iteration"]
        state = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in ckpt["env"]["rollout_state"].items()}
        set_env_state(envs, ckpt["env"]["sub_envs"], state["prev_done"])
        random.setstate(ckpt["rng"]["python"])
        np.random.set_state(tuple(ckpt["rng"]["numpy"]))
        torch.set_rng_state(ckpt["rng"]["torch"])
    if args.compile:  # compile the two hot methods in place: the state_dict keeps its plain names
        agent.act, agent.evaluate_actions = torch.compile(agent.act), torch.compile(agent.evaluate_actions)

    os.makedirs(args.out_dir, exist_ok=True)
    metrics_path, episodes_path = os.path.join(args.out_dir, "metrics.csv"), os.path.join(args.out_dir, "episodes.csv")
    mode = "a" if ckpt is not None and os.path.exists(metrics_path) and os.path.exists(episodes_path) else "w"
    metrics_file, episodes_file = open(metrics_path, mode, newline=""), open(episodes_path, mode, newline="")
    metrics_writer, episodes_writer = csv.writer(metrics_file), csv.writer(episodes_file)
    columns = ["iteration", "step", "time", "return", "length", "policy_loss", "value_loss", "entropy",
               "approx_kl", "clip_frac", "explained_var", "lr", "sps"]
    if mode == "w":
        metrics_writer.writerow(columns)
        episodes_writer.writerow(["step", "return", "length"])
    if args.wandb:
        import wandb
        wandb.init(project="ppo", config=vars(args), name=f"{args.env_id}-seed{args.seed}")

    batch_size = args.num_envs * args.num_steps
    num_iterations = args.total_steps // batch_size
    start_time, start_step = time.time(), step
    pbar = tqdm(range(iteration, num_iterations), desc=f"PPO {args.env_id}", dynamic_ncols=True)
    for iteration in pbar:
        lr = args.lr * (1 - iteration / num_iterations) if args.anneal_lr else args.lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        b, episodes = rollout(envs, agent, state, args.num_steps, args.reward_scale, device)
        step += batch_size
        stats = ppo_update(agent, optimizer, b, args)
        if agent.norm_obs:  # statistics change between rollouts only, so old and new log-probs see the same inputs
            agent.update_obs_stats(torch.from_numpy(b["obs"]).flatten(0, 1).to(device))

        sps = (step - start_step) / (time.time() - start_time)
        ep_return = np.mean([r for r, _ in episodes]) if episodes else float("nan")
        ep_length = np.mean([n for _, n in episodes]) if episodes else float("nan")
        row = {"iteration": iteration + 1, "step": step, "time": round(time.time() - start_time, 3),
               "return": ep_return, "length": ep_length, **stats, "lr": lr, "sps": round(sps)}
        metrics_writer.writerow([row[c] for c in columns])
        episodes_writer.writerows([(step, r, n) for r, n in episodes])
        if episodes:
            pbar.set_postfix(ret=f"{ep_return:.1f}", kl=f"{stats['approx_kl']:.4f}", sps=f"{sps:.0f}")
        if args.wandb:
            wandb.log(row, step=step)
    metrics_file.close()
    episodes_file.close()
    train_time = time.time() - start_time

    ckpt = {"folder": "ppo", "config": vars(args), "model_args": model_args, "model": agent.state_dict(),
            "optimizer": optimizer.state_dict(), "step": step, "iteration": num_iterations,
            "env": {"sub_envs": get_env_state(envs),
                    "rollout_state": {k: torch.as_tensor(v) for k, v in state.items()}},
            "rng": {"python": random.getstate(), "numpy": [x.tolist() if isinstance(x, np.ndarray) else x
                                                          for x in np.random.get_state()],
                    "torch": torch.get_rng_state()}}
    envs.close()
    path = os.path.join(args.out_dir, "ckpt.pt")
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)
    print(f"trained {step} steps in {train_time:.1f} s ({(step - start_step) / train_time:.0f} steps/s); "
          f"saved {path}")
    if args.plot:
        plot_learning_curve(episodes_path, args.plot, args.env_id)
    returns = np.array([])
    if args.eval_episodes > 0:
        returns = evaluate(agent, args.env_id, args.eval_episodes, seed=args.seed + 10_000, device=device)
        print(f"evaluation over {len(returns)} deterministic episodes: {returns.mean():.1f} +- {returns.std():.1f}")
        if args.wandb:
            wandb.log({"eval_return": returns.mean()}, step=step)
    if args.wandb:
        wandb.finish()
    return agent, returns


if __name__ == "__main__":
    main()
