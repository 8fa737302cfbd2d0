// What every native kernel's eval_cpu does first (row_matmul, quant_matmul, bf16_matmul,
// short_attention, row_ops).
#pragma once
#include <vector>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"

namespace kernelext {

// Allocates the output and registers the inputs and the output with the stream's encoder,
// which keeps them alive until the work handed to encoder.dispatch() has run.
inline mlx::core::cpu::CommandEncoder& start_eval(mlx::core::Stream stream,
                                                 const std::vector<mlx::core::array>& inputs,
                                                 mlx::core::array& out) {
  out.set_data(mlx::core::allocator::malloc(out.nbytes()));
  auto& encoder = mlx::core::cpu::get_command_encoder(stream);
  for (auto& a : inputs) encoder.set_input_array(a);
  encoder.set_output_array(out);
  return encoder;
}

}  // namespace kernelext
