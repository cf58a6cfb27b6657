"""Evaluate a trained PPO agent and record a GIF of one episode.

    python ppo/sample.py                             # the shipped policy: 100 episodes, a GIF
    python ppo/sample.py --checkpoint runs/ppo/ckpt.pt  # your own run
    python ppo/sample.py --stochastic --episodes 20  # sample the policy's actions, not its mode
    python ppo/sample.py --out-dir images            # the README's GIF, images/ppo_cartpole.gif
"""
import os
from dataclasses import dataclass
from typing import Literal

import gymnasium as gym
import numpy as np
from PIL import Image

from model import Agent
from plumbing import load_checkpoint, make_out_dir, parse_config, require, setup
from train import act, evaluate


@dataclass
class Config:
    """Evaluate a trained PPO agent and record a GIF of one episode."""
    checkpoint: str = ""  # checkpoint written by train.py ('': the shipped CartPole policy)
    episodes: int = 100  # evaluation episodes, one per environment, run side by side
    stochastic: bool = False  # sample actions instead of taking the policy's mode
    seed: int = 12345  # seed of the evaluation environments and of torch
    gif: bool = True  # record one episode as <out-dir>/ppo_<env>.gif, e.g. ppo_cartpole.gif
    out_dir: str = "runs/ppo"  # where the GIF goes (--out-dir images: the README's picture)
    device: Literal["auto", "cpu", "cuda", "mps"] = "cpu"  # auto: cuda, then mps, then cpu

    def __post_init__(self):
        require(self.episodes >= 1, "--episodes must be at least 1")


def record_gif(agent, env_id, path, seed, device="cpu", deterministic=True, scale=0.5, every=2):
    """One episode as a GIF: frames downscaled by `scale`, one in `every` kept (a small file)."""
    env = gym.make(env_id, render_mode="rgb_array")
    obs, _ = env.reset(seed=seed)
    frames, total, length, done = [], 0.0, 0, False
    while not done:
        if length % every == 0:
            frames.append(env.render())
        action = act(agent, obs[None], deterministic, device)[0]
        if agent.continuous:
            action = np.clip(action, env.action_space.low, env.action_space.high)
        obs, reward, terminated, truncated, _ = env.step(action)
        total, length = total + float(reward), length + 1
        done = terminated or truncated
    fps = env.metadata.get("render_fps", 30)
    env.close()
    images = []
    for frame in frames:
        image = Image.fromarray(frame)
        size = (int(image.width * scale), int(image.height * scale))
        images.append(image.resize(size, Image.Resampling.LANCZOS).quantize(colors=32))
    tmp = f"{path}.tmp.gif"
    images[0].save(tmp, save_all=True, append_images=images[1:], duration=round(1000 * every / fps),
                   loop=0)
    os.replace(tmp, path)
    return total, length


def main(argv=None):
    cfg = parse_config(Config, argv)
    ckpt = load_checkpoint(cfg.checkpoint, "ppo", keys=["config", "model_args", "model", "step"],
                           shipped="cartpole.pt")
    _, _, _, device = setup(cfg)  # seeds torch (and Python, NumPy); the device
    agent = Agent(**ckpt["model_args"]).to(device)
    agent.load_state_dict(ckpt["model"])
    agent.eval()
    env_id = ckpt["config"]["env_id"]
    returns = evaluate(agent, env_id, cfg.episodes, cfg.seed, device, not cfg.stochastic)
    kind = "stochastic" if cfg.stochastic else "deterministic"
    print(f"{env_id}: {kind} return over {cfg.episodes} episodes: {returns.mean():.1f} +- "
          f"{returns.std():.1f} (min {returns.min():.1f}, max {returns.max():.1f}; checkpoint at "
          f"step {ckpt['step']})")
    if cfg.gif:
        gif = make_out_dir(cfg.out_dir) / f"ppo_{env_id.split('-')[0].lower()}.gif"
        total, length = record_gif(agent, env_id, gif, cfg.seed, device, not cfg.stochastic)
        print(f"wrote {gif}: one episode, return {total:.1f}, {length} steps")
    return returns


if __name__ == "__main__":
    main()
