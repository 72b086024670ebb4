// moeforge export: rewrite a model in another format — a Hugging Face
// directory (LLaMA / Qwen2 / Mixtral / Qwen2-MoE names) or a moeforge native
// directory — without changing what it computes.
#include <iostream>

#include "commands.hpp"
#include "model_args.hpp"
#include "moeforge/io/hf.hpp"
#include "moeforge/io/native.hpp"

namespace moeforge::cli {

int run_export(int argc, char** argv) {
  args a("moeforge export",
         "Write a model as a Hugging Face directory (config.json + model.safetensors) or a moeforge native directory.\n"
         "llama2.c's interleaved RoPE is reordered into Hugging Face's half-split form; models Hugging Face cannot\n"
         "express (CMoE routers, novices, unequal experts) are refused: export them as native.");
  add_model_options(a, false);
  a.required("out", "DIR", "output directory (must not exist unless --force)");
  a.option("format", "hf|native", "output format", "hf");
  a.flag("force", "replace --out if it exists (only after the new model is complete)");
  if (!a.parse(argc, argv)) return 0;
  const std::string format = a.get("format");
  if (format != "hf" && format != "native") throw usage_error("moeforge export: --format must be 'hf' or 'native', got '" + format + "'");
  io::check_output_dir(a.get("out"), a.flag_set("force"));
  const auto w = load_model(a);
  if (format == "hf") {
    io::save_hf(w, a.get("out"), a.flag_set("force"));
  } else {
    io::native_save_options o;
    o.overwrite = a.flag_set("force");
    io::save_native(w, a.get("out"), {{"exported_from", a.get("model")}}, o);
  }
  std::cout << "wrote " << a.get("out") << " (" << format << ", " << w.config.n_layers << " layers)\n";
  return 0;
}

}  // namespace moeforge::cli
