"""Writes tests/fixtures/train/rewards.jsonl: GRPO reward scores computed with Python's `re` and str.

The five GSM8K reward functions are the R1-style recipe's (willccbb's grpo_demo.py, as used in TRL's
GRPO examples): extract_xml_answer, extract_hash_answer, correctness_reward_func, int_reward_func,
strict_format_reward_func, soft_format_reward_func, count_xml / xmlcount_reward_func. Python regex
semantics (re.match, no flags) are the reference the Rust port is tested against.
The generic rewards follow the definitions in src/train/rewards.rs (regex: 1.0 on re.match; exact:
1.0 when stripped completion == stripped reference; length: -min(1, max(0, chars - max_chars) / max_chars)).
"""

import json
import os
import re


def extract_xml_answer(text):
    answer = text.split("<answer>")[-1]
    answer = answer.split("</answer>")[0]
    return answer.strip()


def extract_hash_answer(text):
    # The recipe returns None without "####"; runner falls back to the stripped reference so that
    # pre-extracted answers work too.
    if "####" not in text:
        return text.strip()
    return text.split("####")[1].strip()


def correctness(c, ref):
    return 2.0 if extract_xml_answer(c) == extract_hash_answer(ref) else 0.0


def int_reward(c, ref):
    return 0.5 if extract_xml_answer(c).isdigit() else 0.0


def strict_format(c, ref):
    pattern = r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$"
    return 0.5 if re.match(pattern, c) else 0.0


def soft_format(c, ref):
    pattern = r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>"
    return 0.5 if re.match(pattern, c) else 0.0


def count_xml(text):
    count = 0.0
    if text.count("<reasoning>\n") == 1:
        count += 0.125
    if text.count("\n</reasoning>\n") == 1:
        count += 0.125
    if text.count("\n<answer>\n") == 1:
        count += 0.125
        count -= len(text.split("\n</answer>\n")[-1]) * 0.001
    if text.count("\n</answer>") == 1:
        count += 0.125
        count -= (len(text.split("\n</answer>")[-1]) - 1) * 0.001
    return count


REGEX = r"\s*<reasoning>[^<]*\d"
MAX_CHARS = 80


def regex_reward(c, ref):
    return 1.0 if re.match(REGEX, c) else 0.0


def exact(c, ref):
    return 1.0 if c.strip() == ref.strip() else 0.0


def length(c, ref):
    return -min(1.0, max(0, len(c) - MAX_CHARS) / MAX_CHARS)


FUNCS = [("correctness", correctness), ("int", int_reward), ("strict_format", strict_format),
         ("soft_format", soft_format), ("xml_count", lambda c, r: count_xml(c)), ("regex", regex_reward),
         ("exact", exact), ("length", length)]

R, A = "<reasoning>\n", "\n</reasoning>\n<answer>\n"
cases = [
    (R + "6 * 7 = 42" + A + "42\n</answer>\n", "6 times 7\n#### 42"),
    (R + "6 * 7 = 42" + A + "42\n</answer>", "#### 42"),
    (R + "6 * 7 = 42" + A + "42\n</answer>\n\n", "#### 42"),  # Python $ before final newline
    (R + "6 * 7 = 42" + A + "42\n</answer>\n\n\n", "#### 42"),
    (R + "line1\nline2" + A + "42\n</answer>\n", "#### 42"),  # dot does not cross newline
    (R + "x" + A + "4\n2\n</answer>\n", "#### 42"),
    ("<reasoning>x</reasoning><answer>42</answer>", "#### 42"),
    ("<reasoning>x</reasoning> \t\n <answer>42</answer> trailing", "#### 42"),
    ("<reasoning>x</reasoning>\x1c<answer>42</answer>", "#### 42"),  # \x1c is \s in Python only
    ("<reasoning>x</reasoning>\u2003<answer>42</answer>", "#### 42"),
    ("<reasoning>x\n</reasoning><answer>42</answer>", "#### 42"),
    (" <reasoning>x</reasoning><answer>42</answer>", "#### 42"),  # re.match anchors at start
    ("42", "#### 42"),
    ("  42  ", "#### 42"),
    ("\x1f42\x1c", "#### 42"),  # str.strip removes \x1c-\x1f
    ("The answer is 42", "#### 42"),
    ("<answer>41</answer> then <answer> 42 </answer>", "#### 42"),  # last <answer>
    ("<answer>42", "#### 42"),
    ("42</answer><answer>", "#### 42"),
    ("<answer>1,000</answer>", "#### 1,000"),
    ("<answer>-3</answer>", "#### -3"),
    ("<answer>\u00b2\u00b3</answer>", "#### 0"),  # superscripts are isdigit
    ("<answer>\u0663\u0664</answer>", "#### 34"),  # Arabic-Indic digits
    ("<answer>\u00bd</answer>", "#### 0"),  # vulgar fraction is numeric, not a digit
    ("<answer>\u2460</answer>", "#### 1"),  # circled digit one
    ("<answer></answer>", "#### 0"),  # empty is not isdigit
    ("<answer>7</answer>", "no hashes here 7"),
    ("<answer>7</answer>", "  7 "),
    ("<answer>7</answer>", "#### 7 #### 8"),
    (R + R + "dup" + A + "5\n</answer>\n", "#### 5"),
    (R + "a" + A + "5\n</answer>\n" + "extra text after", "#### 5"),
    (R + "a" + A + "5\n</answer>\nmore\n</answer>\n", "#### 5"),
    ("<reasoning>\nab\n</reasoning>\n\n<answer>\n5\n</answer>", "#### 5"),
    ("\n<answer>\n5\n</answer>", "#### 5"),
    ("\n<answer>\n5\n</answer>\n" + "é" * 30, "#### 5"),  # length counts characters
    ("", "#### 0"),
    ("<reasoning>\n\n</reasoning>\n<answer>\n\n</answer>\n", "#### 0"),
    (R + "🙂 emoji" + A + "12\n</answer>\n", "#### 12"),
    ("  <reasoning> 3 apples", "anything"),
    ("<reasoning>\r\nx\r\n</reasoning>\r\n<answer>\r\n3\r\n</answer>\r\n", "#### 3"),
    ("x" * 100, "#### 0"),
    ("x" * 200, "x" * 200),
]

# Group advantages as TRL 1.16 GRPOTrainer (scale_rewards="group"): (r - mean) / (std + 1e-4) with
# trl.trainer.utils.nanstd, which applies Bessel's correction (count / (count - 1)), as torch.std.
def advantages(rewards, g):
    out = []
    for i in range(0, len(rewards), g):
        grp = rewards[i:i + g]
        mean = sum(grp) / g
        std = (sum((x - mean) ** 2 for x in grp) / (g - 1)) ** 0.5 if g > 1 else 0.0
        out += [(x - mean) / (std + 1e-4) for x in grp]
    return out


def main():
    out = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "train", "rewards.jsonl")
    with open(out, "w", encoding="utf-8") as f:
        for completion, reference in cases:
            scores = {name: fn(completion, reference) for name, fn in FUNCS}
            f.write(json.dumps({"completion": completion, "reference": reference, "scores": scores}) + "\n")

    groups = [([2.5, 0.0, 0.5, 3.125, 0.0, 0.0, 1.0, 1.0], 4), ([1.0, 1.0, 1.0, 1.0], 2), ([0.3, -0.2, 0.9], 3),
              ([1.0, 2.0], 1)]
    adv = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "train", "advantages.json")
    with open(adv, "w") as f:
        json.dump([{"rewards": r, "group_size": g, "advantages": advantages(r, g)} for r, g in groups], f, indent=1)
    print(f"wrote {len(cases)} completions to {out} and {len(groups)} groups to {adv}")


if __name__ == "__main__":
    main()
