// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @title Mock stablecoin for development and tests
/// @notice A 6-decimal ERC-20 like USDC. Anyone may mint: never deploy it where it could be taken for money.
contract MockStablecoin is ERC20 {
    constructor() ERC20("Mock USD", "mUSD") {}

    /// @notice USDC-style 6 decimals: 1 token = 1_000_000 units.
    function decimals() public pure override returns (uint8) {
        return 6;
    }

    /// @notice Creates `amount` units for `to` (development only, unrestricted).
    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }
}
